//! Reading tensors' CPU values in place: the strided-view helpers every kernel shares.

use candle_core::{CpuStorage, Layout, Storage, StorageRef, Tensor};

/// The f32 values of a contiguous CPU tensor as a custom op sees them (`op` names the op in
/// errors).
pub fn cpu_f32_slice<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: expected f32 values");
    };
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: expected a contiguous tensor"),
    }
}

/// The f32 values of contiguous CPU tensors outside a custom op (a custom op's backward, or a
/// tensor an op holds), their storages locked while `f` runs; `what` names the caller in errors.
pub fn with_f32s<const N: usize, R>(
    tensors: [&Tensor; N],
    what: &str,
    f: impl FnOnce([&[f32]; N]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let guards = tensors.map(|t| t.storage_and_layout());
    let mut slices: [&[f32]; N] = [&[]; N];
    for (slice, (guard, layout)) in slices.iter_mut().zip(&guards) {
        let Storage::Cpu(cpu) = &**guard else {
            candle_core::bail!("{what}: expected a CPU tensor");
        };
        *slice = cpu_f32_slice(cpu, layout, what)?;
    }
    f(slices)
}

/// A raw pointer shared by threads that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
pub struct SharedMut(pub *mut f32);
// SAFETY: every user writes a region no other thread touches (documented at each use).
unsafe impl Send for SharedMut {}
// SAFETY: as above.
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper).
    pub fn get(self) -> *mut f32 {
        self.0
    }
}

/// A 4-D f32 operand read in place through its strides: its whole storage, start offset and
/// element strides (`what` names it in errors).
#[derive(Clone, Copy)]
pub struct View4<'a> {
    data: &'a [f32],
    start: usize,
    /// Element strides.
    pub st: [usize; 4],
    /// Dimensions.
    pub dims: [usize; 4],
}

impl<'a> View4<'a> {
    /// A view of a CPU storage under `layout`.
    pub fn new(storage: &'a CpuStorage, layout: &Layout, what: &str) -> candle_core::Result<Self> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("{what} should be f32");
        };
        let (d, s) = (layout.shape().dims(), layout.stride());
        if d.len() != 4 {
            candle_core::bail!("{what} should be 4-D, found {d:?}");
        }
        let view = View4 {
            data,
            start: layout.start_offset(),
            st: [s[0], s[1], s[2], s[3]],
            dims: [d[0], d[1], d[2], d[3]],
        };
        // The furthest element must lie inside the storage.
        let last: usize = view.start
            + (0..4)
                .map(|i| (d[i].max(1) - 1) * view.st[i])
                .sum::<usize>();
        if d.iter().all(|&x| x > 0) && last >= data.len() {
            candle_core::bail!("{what}: strides run past its storage");
        }
        Ok(view)
    }

    /// A view of a locked tensor's storage (what [`Tensor::storage_and_layout`] returned).
    pub fn locked(g: &'a (StorageRef<'_>, &Layout), what: &str) -> candle_core::Result<Self> {
        match &*g.0 {
            Storage::Cpu(c) => View4::new(c, g.1, what),
            _ => candle_core::bail!("{what} should be on the CPU"),
        }
    }

    /// Pointer to element `[i0, i1, 0, 0]`.
    pub fn at(&self, i0: usize, i1: usize) -> *const f32 {
        let off = self.start + i0 * self.st[0] + i1 * self.st[1];
        // SAFETY: in bounds for valid indices (checked against the storage in `new`).
        unsafe { self.data.as_ptr().add(off) }
    }

    /// Element `i`.
    pub fn get(&self, i: [usize; 4]) -> f32 {
        self.data[self.start
            + i[0] * self.st[0]
            + i[1] * self.st[1]
            + i[2] * self.st[2]
            + i[3] * self.st[3]]
    }
}
