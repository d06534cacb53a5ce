//! `peft methods`: the registered methods; `peft devices`: the devices and kernels of this
//! build.

use anyhow::Result;

/// Prints one line per registered method: peft_type, crate, description.
pub fn run() -> Result<()> {
    let regs = peft::registry::registrations()?;
    if regs.is_empty() {
        println!("no methods are linked into this build (enable a feature such as `lora`)");
    }
    for r in regs {
        println!("{:<16} {:<14} {}", r.peft_type, r.crate_name, r.description);
    }
    Ok(())
}

/// Prints the backends this build has, whether `asked` (`--device`) opens, and the CPU
/// kernels in use; fails when `asked` does not open.
pub fn devices(asked: &str) -> Result<()> {
    let yes_no = |b: bool| if b { "built" } else { "not built" };
    println!("cpu     available");
    println!("cuda    {}", yes_no(peft::device::cuda_built()));
    println!("metal   {}", yes_no(peft::device::metal_built()));
    let f = peft::kernels::cpu::features();
    println!(
        "kernels {} (PEFT_KERNELS={}; CPU avx2+fma {}, avx512f {})",
        if peft::kernels::portable() {
            "portable: candle ops everywhere"
        } else {
            "fused on the CPU, portable elsewhere"
        },
        std::env::var("PEFT_KERNELS").unwrap_or_default(),
        f.avx2_fma,
        f.avx512f
    );
    let device = peft::device::open_device(asked)?;
    println!("device  {} opens", peft::device::device_name(&device));
    Ok(())
}
