//! torch's CPU random number generator, reproduced exactly: a `torch.Generator().manual_seed(s)`
//! is a 32-bit Mersenne Twister (MT19937) seeded with `s`, and `tensor.uniform_(a, b,
//! generator=g)` on a float32 CPU tensor fills it in memory order with
//! `fma((u & 0xFFFFFF) · 2⁻²⁴, b - a, a)` for successive 32-bit outputs `u`. Methods whose
//! frozen tensors peft regenerates from a seed instead of saving (VeRA's projections with
//! `save_projection=false`) draw them here, so an adapter made by either library rebuilds the
//! same tensors in the other.

/// torch's CPU generator (`at::mt19937`).
#[derive(Debug, Clone)]
pub struct TorchGenerator {
    state: Box<[u32; 624]>,
    index: usize,
}

impl TorchGenerator {
    /// `torch.Generator().manual_seed(seed)` (torch keeps the low 32 bits).
    pub fn manual_seed(seed: u64) -> Self {
        let mut state = Box::new([0u32; 624]);
        state[0] = seed as u32;
        for i in 1..624 {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        TorchGenerator { state, index: 624 }
    }

    /// The next 32-bit output (`generator->random()`).
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            for k in 0..624 {
                let y = (self.state[k] & 0x8000_0000) | (self.state[(k + 1) % 624] & 0x7fff_ffff);
                let mag = if y & 1 == 1 { 0x9908_b0df } else { 0 };
                self.state[k] = self.state[(k + 397) % 624] ^ (y >> 1) ^ mag;
            }
            self.index = 0;
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    /// `n` values of `torch.empty(n).uniform_(from, to, generator=g)` (float32).
    pub fn uniform(&mut self, n: usize, from: f64, to: f64) -> Vec<f32> {
        let (from, to) = (from as f32, to as f32);
        let range = to - from;
        (0..n)
            .map(|_| {
                let x = (self.next_u32() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0);
                x.mul_add(range, from)
            })
            .collect()
    }

    /// The next 64-bit output (`generator->random64()`: two 32-bit draws, the first high).
    pub fn next_u64(&mut self) -> u64 {
        let hi = self.next_u32() as u64;
        (hi << 32) | self.next_u32() as u64
    }

    /// The first `k` entries of `torch.randperm(n, generator=g)`. Below `u32::MAX / 20` torch
    /// runs Fisher–Yates forwards with 32-bit draws, so the first `k` positions are final after
    /// `k` steps and only those are simulated (`O(k)` time and memory); above it torch switches
    /// to the inside-out variant with 64-bit draws, simulated in full (`O(n)`).
    pub fn randperm_prefix(&mut self, n: u64, k: usize) -> Vec<u64> {
        let k = (k as u64).min(n) as usize;
        if n < (u32::MAX / 20) as u64 {
            let mut moved: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
            let mut out = Vec::with_capacity(k);
            for i in 0..k as u64 {
                let value = if i + 1 < n {
                    let z = i + self.next_u32() as u64 % (n - i);
                    let at_i = moved.get(&i).copied().unwrap_or(i);
                    let at_z = moved.get(&z).copied().unwrap_or(z);
                    moved.insert(z, at_i);
                    at_z
                } else {
                    moved.get(&i).copied().unwrap_or(i)
                };
                out.push(value);
            }
            return out;
        }
        if n <= u32::MAX as u64 + 1 {
            // Entries fit in 32 bits: half the memory.
            let mut r: Vec<u32> = vec![0; n as usize];
            for i in 0..n {
                let z = (self.next_u64() % (i + 1)) as usize;
                r[i as usize] = r[z];
                r[z] = i as u32;
            }
            r.truncate(k);
            return r.into_iter().map(u64::from).collect();
        }
        let mut r: Vec<u64> = vec![0; n as usize];
        for i in 0..n {
            let z = (self.next_u64() % (i + 1)) as usize;
            r[i as usize] = r[z];
            r[z] = i;
        }
        r.truncate(k);
        r
    }

    /// torch's `kaiming_uniform_` with gain `√2` (`a=0`, the `nonlinearity="relu"` default) on a
    /// 2-D tensor of `shape`: uniform on `±√(6 / fan_in)`, `fan_in = shape[1]`, in memory order.
    pub fn kaiming_uniform(&mut self, shape: (usize, usize)) -> Vec<f32> {
        let bound = (6.0 / shape.1.max(1) as f64).sqrt();
        self.uniform(shape.0 * shape.1, -bound, bound)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference MT19937 sequence for seed 5489 (`std::mt19937`'s default: its 10000th
    /// output is 4123659995, as the C++ standard requires).
    #[test]
    fn matches_the_standard_mersenne_twister() {
        let mut g = TorchGenerator::manual_seed(5489);
        let mut last = 0;
        for _ in 0..10_000 {
            last = g.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
    }
}
