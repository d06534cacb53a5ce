//! `peft methods`: the registered methods.

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
