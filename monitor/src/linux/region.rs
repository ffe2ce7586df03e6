//! The regions the Linux model protects and reports under, as a type. The
//! integrity engine takes any region name (a string in the baseline and in
//! findings); the Linux layer makes and reads those names only through
//! [`Region`], so that a name is spelt in one place.

use std::borrow::Cow;
use std::fmt;

/// A region of the Linux model.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Region {
    /// The kernel image's read-only executable pages (`_text` to `_etext`).
    Text,
    /// Its read-only data (`__start_rodata` to `__end_rodata`).
    Rodata,
    /// An interrupt descriptor table: `cpu` is `None` for the table the
    /// first vCPU uses, the vCPU's index for any other.
    Idt { cpu: Option<u32> },
    /// A vCPU's global descriptor table.
    Gdt { cpu: u32 },
    /// A loaded module's text.
    Module(String),
    /// The kernel's placement (KASLR) against the profile.
    Kaslr,
    /// A system call table, by its symbol (`sys_call_table`,
    /// `ia32_sys_call_table`).
    SyscallTable(Cow<'static, str>),
    /// Where the IDT's gates point.
    IdtVectors,
    /// The GDT's kernel descriptors, judged by what they allow.
    GdtDescriptors,
    /// Executable memory outside the image: modules, trampolines, probes.
    ModuleArea,
    /// The kernel's patch records themselves.
    PatchTables,
    /// Callbacks the kernel runs for others at its functions and traps.
    Hooks,
}

const TEXT: &str = "kernel-text";
const RODATA: &str = "kernel-rodata";
const MODULE_PREFIX: &str = "module:";
const IDT: &str = "idt";
const IDT_CPU: &str = "idt-cpu";
const GDT_CPU: &str = "gdt-cpu";
const KASLR: &str = "kaslr";
const IDT_VECTORS: &str = "idt-vectors";
const GDT_DESCRIPTORS: &str = "gdt-descriptors";
const MODULE_AREA: &str = "module-area";
const PATCH_TABLES: &str = "patch-tables";
const HOOKS: &str = "hooks";
const SYSCALL_TABLES: [&str; 2] = ["sys_call_table", "ia32_sys_call_table"];

impl Region {
    /// The region's name, as baselines and findings carry it.
    pub fn name(&self) -> Cow<'static, str> {
        match self {
            Region::Text => TEXT.into(),
            Region::Rodata => RODATA.into(),
            Region::Idt { cpu: None } => IDT.into(),
            Region::Idt { cpu: Some(n) } => format!("{IDT_CPU}{n}").into(),
            Region::Gdt { cpu } => format!("{GDT_CPU}{cpu}").into(),
            Region::Module(name) => format!("{MODULE_PREFIX}{name}").into(),
            Region::Kaslr => KASLR.into(),
            Region::SyscallTable(symbol) => symbol.clone(),
            Region::IdtVectors => IDT_VECTORS.into(),
            Region::GdtDescriptors => GDT_DESCRIPTORS.into(),
            Region::ModuleArea => MODULE_AREA.into(),
            Region::PatchTables => PATCH_TABLES.into(),
            Region::Hooks => HOOKS.into(),
        }
    }

    /// The region a name is, if the Linux model gives that name.
    pub fn parse(name: &str) -> Option<Region> {
        let cpu = |prefix: &str| name.strip_prefix(prefix)?.parse::<u32>().ok();
        Some(match name {
            TEXT => Region::Text,
            RODATA => Region::Rodata,
            IDT => Region::Idt { cpu: None },
            KASLR => Region::Kaslr,
            IDT_VECTORS => Region::IdtVectors,
            GDT_DESCRIPTORS => Region::GdtDescriptors,
            MODULE_AREA => Region::ModuleArea,
            PATCH_TABLES => Region::PatchTables,
            HOOKS => Region::Hooks,
            _ if SYSCALL_TABLES.contains(&name) => {
                Region::SyscallTable(SYSCALL_TABLES.into_iter().find(|s| *s == name)?.into())
            }
            _ => {
                if let Some(module) = name.strip_prefix(MODULE_PREFIX) {
                    Region::Module(module.to_owned())
                } else if let Some(n) = cpu(IDT_CPU) {
                    Region::Idt { cpu: Some(n) }
                } else {
                    Region::Gdt { cpu: cpu(GDT_CPU)? }
                }
            }
        })
    }

    /// The module whose text a region name is, if it is one.
    pub fn module_of(name: &str) -> Option<&str> {
        name.strip_prefix(MODULE_PREFIX)
    }

    /// Whether a region name is a module's text.
    pub fn is_module(name: &str) -> bool {
        Region::module_of(name).is_some()
    }

    /// Whether a region name is this region.
    pub fn is(&self, name: &str) -> bool {
        self.name() == name
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_region_is_read_back_from_its_name() {
        let all = [
            Region::Text,
            Region::Rodata,
            Region::Idt { cpu: None },
            Region::Idt { cpu: Some(3) },
            Region::Gdt { cpu: 0 },
            Region::Module("ext4".into()),
            Region::Kaslr,
            Region::SyscallTable("sys_call_table".into()),
            Region::SyscallTable("ia32_sys_call_table".into()),
            Region::IdtVectors,
            Region::GdtDescriptors,
            Region::ModuleArea,
            Region::PatchTables,
        ];
        for r in all {
            assert_eq!(Region::parse(&r.name()), Some(r.clone()), "{r}");
        }
        assert_eq!(Region::Module("ext4".into()).to_string(), "module:ext4");
        assert_eq!(Region::Text.to_string(), "kernel-text");
        assert_eq!(Region::Gdt { cpu: 1 }.to_string(), "gdt-cpu1");
        assert_eq!(Region::module_of("module:ext4"), Some("ext4"));
        assert_eq!(Region::module_of("kernel-text"), None);
        for other in
            ["modules", "gdt-cpu", "gdt-cpux", "idt-cpu-1", "registers", "kernel-image", ""]
        {
            assert_eq!(Region::parse(other), None, "{other:?}");
        }
        assert!(!Region::is_module("modules") && Region::is_module("module:"));
    }
}
