//! `vigil-lab`: start, drive and stop lab guests by hand or from scripts.

use std::process::ExitCode;

use vigil_lab::{Lab, Memory};

const USAGE: &str = "usage:
  vigil-lab start NAME [--private] [--acpi] [--kernel 6.1|6.12]
                                     boot lab guest vigil-lab-NAME (shared memfd RAM unless
                                     --private; with ACPI and its power button heard: --acpi;
                                     the kernel line, 6.1 unless --kernel says)
  vigil-lab exec NAME COMMAND...     run a shell command in it (e.g. 'attack inline')
  vigil-lab stop NAME                destroy it
  vigil-lab confine UNIT -- PROGRAM [ARGS...]
                                     run PROGRAM as UNIT (a systemd unit file) would run it:
                                     its user, groups, capabilities and system-call filter
                                     (for hosts where systemd is not PID 1; see lab/src/confine.rs)

Attacks available in the guest: attack syscall | inline | idt | wp | remap ... (lab/initramfs/attack).
The lab must be prepared first with lab/setup.sh.";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vigil-lab: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    match args {
        [cmd, name, rest @ ..] if cmd == "start" => {
            let memory = if rest.iter().any(|a| a == "--private") {
                Memory::Private
            } else {
                Memory::Shared
            };
            let acpi = rest.iter().any(|a| a == "--acpi");
            let kernel = match rest.iter().position(|a| a == "--kernel") {
                None => vigil_lab::Kernel::default(),
                Some(i) => {
                    let line = rest.get(i + 1).map_or("", String::as_str);
                    vigil_lab::Kernel::from_line(line)
                        .ok_or_else(|| format!("--kernel takes 6.1 or 6.12, not {line:?}"))?
                }
            };
            let shape = vigil_lab::Shape { memory, acpi, kernel, ..vigil_lab::Shape::default() };
            let g = Lab::open()?.start_with(name, &shape)?;
            println!("{}", g.name);
            g.keep();
            Ok(())
        }
        [cmd, name, command @ ..] if cmd == "exec" && !command.is_empty() => {
            let mut g = Lab::open()?.attach(name)?;
            let (status, out) = g.exec(&command.join(" "))?;
            print!("{out}");
            g.keep();
            if status != 0 {
                return Err(format!("command exited {status}").into());
            }
            Ok(())
        }
        [cmd, name] if cmd == "stop" => {
            vigil_lab::destroy(name)?;
            Ok(())
        }
        [cmd, unit, dashes, program, rest @ ..] if cmd == "confine" && dashes == "--" => {
            let confinement = std::sync::Arc::new(vigil_lab::confine::Confinement::from_unit(
                std::path::Path::new(unit),
            )?);
            eprintln!("vigil-lab: confining {program}: {}", confinement.summary);
            let mut child = std::process::Command::new(program);
            child.args(rest);
            confinement.apply(&mut child);
            // exec returns only on failure.
            let e = std::os::unix::process::CommandExt::exec(&mut child);
            Err(format!("starting {program} confined: {e}").into())
        }
        _ => Err(USAGE.into()),
    }
}
