//! The `vigil` command line.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};

use vigil::daemon::control::Request;
use vigil::integrity::baseline::DomainId;
use vigil::integrity::{Baseline, Finding, FindingKind, Originals};
use vigil::libvirt::{GuestDomain, Hypervisor, SourceChoice, error_chain};
use vigil::linux::KernelReport;
use vigil::linux::discover;
use vigil::linux::hooks::Inventory;
use vigil::linux::session::{ExamineError, examine_once};

/// Exit status when a check finds the kernel intact, or a command succeeds.
const EXIT_OK: u8 = 0;
/// Exit status when a check finds violations.
const EXIT_VIOLATIONS: u8 = 1;
/// Exit status on any error.
const EXIT_ERROR: u8 = 2;
/// EFER of a 64-bit kernel: long mode enabled and active, no-execute on.
const EFER_LONG_MODE_NX: u64 = 0xd00;

#[derive(Parser)]
#[command(
    name = "vigil",
    version,
    about = "Host-side integrity monitor for the kernels of libvirt/QEMU guests",
    long_about = "vigil reads a running guest's memory from the host (no agent in the guest), finds its \
kernel's code, read-only data and descriptor tables by walking its page tables, and records a BLAKE3 \
baseline of them together with the page mappings and control registers. A later check reports every \
page whose bytes, mapping or permissions changed, and every weakened control register.

Typical use:
  vigil domains                      list domains and how their memory can be read
  vigil baseline web1                record the trusted state of web1's kernel
  vigil check web1                   compare with it: exit 0 intact, 1 changed, 2 error
  vigil check web1 --format json     the same, for tools

Run as root, or as the daemon's unit does: a user in group libvirt with
CAP_SYS_PTRACE (reading QEMU's memory), CAP_DAC_READ_SEARCH and
CAP_CHECKPOINT_RESTORE (mapping shared guest RAM through /proc/PID/map_files)."
)]
struct Cli {
    /// libvirt connection URI [default: qemu:///system; for `daemon`, its configuration's
    /// `connect` first].
    #[arg(long, short = 'c', global = true, env = "VIGIL_CONNECT")]
    connect: Option<String>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Where baselines are kept (baselines/<domain uuid>.json) [default: /var/lib/vigil].
    #[arg(long, global = true, env = "VIGIL_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Directories of guest profiles (`*.profile`), for names and semantic checks
    /// (repeat, or separate with ':'), replacing the search path [default:
    /// /etc/vigil/guest-profiles, STATE_DIR/guest-profiles, /usr/share/vigil/guest-profiles;
    /// see `vigil profile list`].
    #[arg(long = "profiles", global = true, env = "VIGIL_PROFILES", value_delimiter = ':')]
    profiles: Vec<PathBuf>,
    /// The daemon's control socket, for `status` and `accept` (and where `daemon` creates it)
    /// [default: /run/vigil/control.sock; for `daemon`, its configuration's `control_socket`
    /// first].
    #[arg(long, global = true, env = "VIGIL_CONTROL_SOCKET")]
    control_socket: Option<PathBuf>,
    /// A module allowed to hook (MODULE, MODULE:SYMBOL for one hooked function, or
    /// bpf:PROGRAM for a BPF program's fmod_ret), for
    /// `check`, `diff` and `hooks`: its redirecting hooks are information, not violations
    /// (repeat, or separate with ','; the daemon reads `hooks.allow` from its configuration).
    #[arg(long = "allow-hook", global = true, env = "VIGIL_ALLOW_HOOKS", value_delimiter = ',')]
    allow_hook: Vec<vigil::linux::hooks::Allowed>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Text,
    Json,
    /// One self-contained HTML page (`vigil diff` only).
    Html,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Source {
    /// Map shared RAM directly when the domain has it, otherwise read the QEMU process.
    Auto,
    /// Map the domain's shared RAM (memfd or file backend with access mode='shared').
    Shared,
    /// Read the QEMU process's memory with process_vm_readv (works for every domain).
    Process,
}

impl From<Source> for SourceChoice {
    fn from(s: Source) -> Self {
        match s {
            Source::Auto => SourceChoice::Auto,
            Source::Shared => SourceChoice::Shared,
            Source::Process => SourceChoice::Process,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// List libvirt domains, their state, and which memory source applies.
    Domains,
    /// Find a running domain's kernel and record a baseline of it.
    Baseline {
        /// Domain name or UUID.
        domain: String,
        /// Where to write the baseline [default: STATE_DIR/baselines/<uuid>.json].
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
        /// How to read guest memory.
        #[arg(long, value_enum, default_value_t = Source::Auto)]
        source: Source,
    },
    /// Compare a running domain's kernel with its baseline.
    ///
    /// Exit status: 0 when intact, 1 when anything was changed in a way that
    /// is a violation, 2 on error (domain not running, memory not readable,
    /// kernel not found, baseline of another domain or of another run of it).
    ///
    /// Whether the guest booted again is libvirt's to say: a baseline taken
    /// under another QEMU process than the one running the domain now, one
    /// that booted it (the domain was started since), is refused; a process
    /// that received the guest's memory (a restore, a migration) is checked
    /// against it. Under the same process a kernel found elsewhere is
    /// reported page by page as `remap` violations, since a guest can move
    /// its own kernel; after a `virsh reboot` or `virsh reset`, which keep
    /// the process, take a new baseline.
    Check {
        /// Domain name or UUID.
        domain: String,
        /// Baseline to compare with [default: STATE_DIR/baselines/<uuid>.json].
        #[arg(long)]
        baseline: Option<PathBuf>,
        /// How to read guest memory.
        #[arg(long, value_enum, default_value_t = Source::Auto)]
        source: Source,
    },
    /// Show exactly what changed: bytes, code and pointers, before and after.
    ///
    /// For every change a check finds: region, guest virtual and physical
    /// address, symbol+offset, the verdict and the rule behind it, the bytes
    /// before and after, and for code both sides disassembled with branch and
    /// call targets named (a symbol, a module, or memory no module owns).
    /// Syscall table and IDT entries show the entry, and the old and new
    /// target with their owners. Accepted kernel patches are listed too.
    ///
    /// Live:    vigil diff web1 [--baseline FILE]
    /// Offline: vigil diff --baseline FILE --dump web1.core
    /// (a dump from `virsh dump --memory-only --format elf web1 web1.core`,
    /// or a raw guest-physical image). Exit status as `check`.
    Diff(DiffArgs),
    /// Watch every running domain: check continuously, alert, export metrics.
    ///
    /// Runs in the foreground (as systemd's vigil.service does). Alerts go to
    /// the alert log (one JSON object per line, fsynced) and to stdout;
    /// metrics are served on /metrics; `vigil status` and `vigil accept` talk
    /// to it through the control socket. Command-line flags override the
    /// configuration file.
    Daemon {
        /// TOML configuration file (see systemd/vigil.toml for every key).
        #[arg(long)]
        config: Option<PathBuf>,
        /// ADDRESS:PORT to serve /metrics on [default: 127.0.0.1:9797].
        #[arg(long)]
        metrics_listen: Option<String>,
        /// File to append alerts to [default: STATE_DIR/alerts.jsonl].
        #[arg(long)]
        alert_log: Option<PathBuf>,
        /// Only validate the configuration, print the settings, and exit.
        #[arg(long)]
        check_config: bool,
    },
    /// Ask the running daemon which domains it watches and how they are.
    Status,
    /// Prove a running kernel's text and read-only data against the vendor's image
    ///
    /// Reads the reference `vigil profile build` keeps beside the profile
    /// (RELEASE.reference): the image's sections, its KASLR relocations and
    /// every place the kernel rewrites itself (alternatives, paravirt and
    /// direct calls, retpolines, return thunks, lock prefixes, ENDBR seals,
    /// run-time constants, ftrace, jump labels, static calls). A run of bytes
    /// that is neither the image's nor a form the kernel writes at that place
    /// is a critical `reference` mismatch, named by function or syscall table
    /// entry, however long it was there. Data the kernel writes during boot
    /// (ro_after_init) is not compared byte for byte: its jump table and
    /// static call sites are compared as sets, and its words must not point
    /// into a module or into kernel text off a function's start. The same
    /// check runs on each boot's first baseline.
    ///
    /// Live: vigil verify web1
    ///
    /// Offline: vigil verify --dump web1.core (from `virsh dump --memory-only --format elf web1 web1.core`)
    ///
    /// Exit status: 0 verified, 1 mismatches, 2 nothing verified (no
    /// profile or reference, or an error).
    Verify {
        /// Domain name or UUID (live); not needed with --dump.
        #[arg(required_unless_present = "dump")]
        domain: Option<String>,
        /// An ELF core (`virsh dump --memory-only --format elf`) to verify instead.
        #[arg(long)]
        dump: Option<PathBuf>,
        /// The reference file [default: RELEASE.reference beside the matching profile].
        #[arg(long)]
        reference: Option<PathBuf>,
    },
    /// List what hooks a running kernel, and whose code each hook runs
    ///
    /// Read from the kernel's own records: every ftrace ops (the functions it
    /// filters, its flags, its callback and trampoline, its direct calls),
    /// every BPF trampoline (its fentry, fexit and fmod_ret programs), every
    /// livepatch (its replacement functions), every kprobe and kretprobe
    /// (where, and its handlers), and every die notifier (called for the
    /// traps, int3 among them, that no kprobe claims). Each callback is
    /// owned by a kernel function, a listed module (`module NAME+0xoff`), a
    /// BPF image, or nothing known.
    ///
    /// Verdicts, as `check` and the daemon give them: a record that lies
    /// where the kernel keeps no such records, a callback in no known code,
    /// a hook that can redirect execution (any ftrace ops or direct call,
    /// a livepatch, any kprobe or kretprobe, a die notifier) owned by a
    /// module, or a BPF fmod_ret program is a violation; a module's
    /// tracepoint probes are information. The kernel's own
    /// hooks (its tracers, perf, BPF core) and observing BPF programs are
    /// listed only. Allow a product's module with --allow-hook MODULE, a
    /// BPF program with --allow-hook bpf:NAME (or the daemon's
    /// `hooks.allow`). `vigil diff` lists the hooks added since the baseline.
    ///
    /// Example: vigil hooks web1 --allow-hook falcon_lsm
    ///
    /// Exit status: 0 no violation, 1 a violating hook, 2 nothing read (no
    /// profile matches the kernel, or an error).
    Hooks {
        /// Domain name or UUID.
        domain: String,
        /// How to read guest memory.
        #[arg(long, value_enum, default_value_t = Source::Auto)]
        source: Source,
    },
    /// Guest profiles: what vigil knows of one kernel build (see guest-profiles/README.md).
    #[command(subcommand)]
    Profile(ProfileCommand),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    ///
    /// The Debian package installs them; elsewhere, for example:
    ///
    ///   vigil completions bash > /etc/bash_completion.d/vigil
    ///   vigil completions zsh > /usr/local/share/zsh/site-functions/_vigil
    ///   vigil completions fish > ~/.config/fish/completions/vigil.fish
    #[command(verbatim_doc_comment)]
    Completions { shell: clap_complete::Shell },
    /// Print the manual page, in roff (the Debian package installs it as vigil(8))
    ///
    /// With --dir, write it and a page of each subcommand with its options
    /// (vigil-check.8, vigil-profile-build.8, ...) into that directory.
    #[command(hide = true)]
    Man {
        /// Write vigil.8 and the subcommands' pages here instead.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Make a watched domain's current state its baseline, recording who, why and which diff
    ///
    /// After a sanctioned change, review first, then accept what you reviewed:
    ///
    ///   vigil diff web1 --daemon          the daemon's diff; note its "diff digest"
    ///   vigil accept web1 --diff-digest D --reason "CHG-4711: livepatch for CVE-..."
    ///
    /// With --diff-digest the daemon diffs the guest again and refuses (exit
    /// status 2, nothing accepted) if the diff is not the one reviewed: the
    /// guest changed since. Without it, whatever is there now is accepted,
    /// and the digest of that diff is recorded. The daemon records an
    /// `accepted` warning in the alert log (and pushes it to its
    /// Alertmanager) with your uid, user name and process id, as the kernel
    /// tells them, the reason and the digest.
    #[command(verbatim_doc_comment)]
    Accept {
        /// Domain name or UUID.
        domain: String,
        /// Why: who approved which change (kept in the alert log; one line, at
        /// most 1024 bytes).
        #[arg(long)]
        reason: String,
        /// The "diff digest" of the diff you reviewed (`vigil diff DOMAIN
        /// --daemon`): accept only if the guest's diff is still that one.
        #[arg(long, value_name = "DIGEST")]
        diff_digest: Option<String>,
    },
}

#[derive(clap::Args)]
struct DiffArgs {
    /// Domain name or UUID (live); not needed with --dump.
    domain: Option<String>,
    /// Baseline to compare with [default for a live domain: STATE_DIR/baselines/<uuid>.json].
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// A memory dump to examine instead of a live domain: an ELF core as
    /// `virsh dump --memory-only` writes it, or a raw guest-physical image.
    #[arg(long)]
    dump: Option<PathBuf>,
    /// Only changes in this region (kernel-text, kernel-rodata, sys_call_table, idt-vectors, ...).
    /// The diff digest still covers every region: an accept takes them all.
    #[arg(long)]
    region: Option<String>,
    /// Ask the running daemon (through its control socket) for the diff of a
    /// domain it watches: its baseline, and the module text it keeps.
    #[arg(long)]
    daemon: bool,
}

#[derive(Subcommand)]
enum ProfileCommand {
    /// Make the profile of a vendor kernel image (vmlinuz or vmlinux).
    Build {
        /// The kernel image, as the distribution ships it (e.g. /boot/vmlinuz-6.1.0-56-cloud-amd64).
        vmlinuz: PathBuf,
        /// Where to write it [default: STATE_DIR/guest-profiles/<release>.profile, on the
        /// search path of `vigil check` and the daemon; ./guest-profiles/ if that cannot be
        /// written].
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
    },
    /// List the guest profiles found, and which running domain's kernel each matches
    ///
    /// Profiles are looked for in, in order:
    ///
    ///   /etc/vigil/guest-profiles          your own
    ///   STATE_DIR/guest-profiles           made by `vigil profile build` on this host
    ///   /usr/share/vigil/guest-profiles    shipped with vigil
    ///
    /// The first profile of a kernel release is used; one of the same release
    /// later in the path is shadowed. --profiles replaces the path. A domain
    /// whose kernel no profile matches is listed with the kernel's own banner,
    /// to say which vmlinuz to build one from.
    #[command(verbatim_doc_comment)]
    List {
        /// Only the profiles: do not ask libvirt for the running domains.
        #[arg(long)]
        no_domains: bool,
        /// How to read guest memory.
        #[arg(long, value_enum, default_value_t = Source::Auto)]
        source: Source,
    },
}

/// Writes the built `cmd`'s manual page into `dir` as `NAME.8` and, after
/// it, one of each visible subcommand (`vigil-profile-build.8`); how many
/// were written.
fn write_man_pages(cmd: &clap::Command, dir: &Path) -> anyhow::Result<usize> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = cmd.get_display_name().unwrap_or(cmd.get_name());
    let path = dir.join(format!("{name}.8"));
    let mut page = Vec::new();
    let man = clap_mangen::Man::new(cmd.clone())
        .section("8")
        .source(format!("vigil {}", env!("CARGO_PKG_VERSION")))
        .manual("vigil");
    // clap's own `help` has a page, since the others name it, but not its
    // topics (`help check`): they are the subcommands' own pages.
    let help = cmd.get_name() == "help";
    if help {
        man.render_title(&mut page)?;
        man.render_name_section(&mut page)?;
        man.render_synopsis_section(&mut page)?;
        man.render_description_section(&mut page)?;
    } else {
        man.render(&mut page)?;
    }
    write_whole(&path, &page)?;
    let mut written = 1;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && !help) {
        written += write_man_pages(sub, dir)?;
    }
    Ok(written)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("vigil: error: {}", chain.join(": "));
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn profile_dirs(cli: &Cli) -> Vec<PathBuf> {
    if cli.profiles.is_empty() {
        vigil::paths::profile_path(&state_dir(cli))
    } else {
        cli.profiles.clone()
    }
}

fn state_dir(cli: &Cli) -> PathBuf {
    cli.state_dir.clone().unwrap_or_else(|| PathBuf::from(vigil::paths::STATE_DIR))
}

impl Cli {
    /// The libvirt URI of the commands that connect themselves (the daemon
    /// takes `--connect` only as an override of its configuration).
    fn uri(&self) -> &str {
        self.connect.as_deref().unwrap_or("qemu:///system")
    }

    /// The control socket the client commands ask.
    fn control_socket(&self) -> PathBuf {
        self.control_socket.clone().unwrap_or_else(|| vigil::paths::CONTROL_SOCKET.into())
    }
}

fn run(cli: &Cli) -> anyhow::Result<u8> {
    if cli.format == Format::Html && !matches!(cli.command, Command::Diff(_)) {
        bail!("--format html is for `vigil diff`; other commands print text or json");
    }
    match &cli.command {
        Command::Daemon { config, metrics_listen, alert_log, check_config } => {
            let over = vigil::daemon::config::Overrides {
                connect: cli.connect.clone(),
                state_dir: cli.state_dir.clone(),
                alert_log: alert_log.clone(),
                metrics_listen: metrics_listen.clone(),
                control_socket: cli.control_socket.clone(),
                profiles: (!cli.profiles.is_empty()).then(|| cli.profiles.clone()),
            };
            let settings = vigil::daemon::config::Settings::load(config.as_deref(), &over)?;
            if *check_config {
                println!("configuration OK: {settings:#?}");
                return Ok(EXIT_OK);
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(vigil::daemon::run(settings))?;
            Ok(EXIT_OK)
        }
        Command::Status => control(cli, &Request::Status),
        Command::Hooks { domain, source } => hooks(cli, domain, *source),
        Command::Verify { domain, dump, reference } => {
            verify(cli, domain.as_deref(), dump.as_deref(), reference.as_deref())
        }
        Command::Profile(ProfileCommand::Build { vmlinuz, output }) => {
            profile_build(cli, vmlinuz, output.as_deref())
        }
        Command::Profile(ProfileCommand::List { no_domains, source }) => {
            profile_list(cli, !*no_domains, *source)
        }
        Command::Accept { domain, reason, diff_digest } => {
            let req = Request::Accept {
                domain: domain.clone(),
                reason: reason.clone(),
                diff_digest: diff_digest.clone(),
            };
            control(cli, &req)
        }
        Command::Domains => domains(cli),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            // Made whole first: the generator panics on a failed write.
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "vigil", &mut script);
            std::io::stdout().lock().write_all(&script)?;
            Ok(EXIT_OK)
        }
        Command::Man { dir: None } => {
            use clap::CommandFactory;
            let page = clap_mangen::Man::new(Cli::command()).section("8");
            page.render(&mut std::io::stdout().lock())?;
            Ok(EXIT_OK)
        }
        Command::Man { dir: Some(dir) } => {
            use clap::CommandFactory;
            // Built, each subcommand is named as its page ("vigil-check")
            // and shown as typed ("vigil profile build").
            let mut cmd = Cli::command().bin_name("vigil");
            cmd.build();
            let written = write_man_pages(&cmd, dir)?;
            eprintln!("vigil: {written} manual pages written to {}", dir.display());
            Ok(EXIT_OK)
        }
        Command::Baseline { domain, output, source } => {
            baseline(cli, domain, output.as_deref(), *source)
        }
        Command::Check { domain, baseline, source } => {
            check_domain(cli, domain, baseline.as_deref(), *source)
        }
        Command::Diff(a) => diff(cli, a),
    }
}

fn default_baseline_path(cli: &Cli, dom: &GuestDomain) -> PathBuf {
    vigil::paths::baseline_path(&state_dir(cli), &dom.uuid)
}

fn domains(cli: &Cli) -> anyhow::Result<u8> {
    let hv = Hypervisor::connect(cli.uri())?;
    let list = hv.domains()?;
    let mut out = std::io::stdout().lock();
    if cli.format == Format::Json {
        serde_json::to_writer_pretty(
            &mut out,
            &serde_json::json!({ "connect": hv.uri(), "domains": list }),
        )?;
        writeln!(out)?;
        return Ok(EXIT_OK);
    }
    if list.is_empty() {
        writeln!(out, "no domains at {}", hv.uri())?;
        return Ok(EXIT_OK);
    }
    let w = list.iter().map(|d| d.name.len()).max().unwrap_or(4).max(4);
    writeln!(out, "{:w$}  {:36}  {:13}  MEMORY SOURCE", "NAME", "UUID", "STATE")?;
    for d in &list {
        writeln!(out, "{:w$}  {:36}  {:13}  {}", d.name, d.uuid, d.state, d.memory_source)?;
    }
    Ok(EXIT_OK)
}

fn baseline(cli: &Cli, domain: &str, output: Option<&Path>, source: Source) -> anyhow::Result<u8> {
    let hv = Hypervisor::connect(cli.uri())?;
    let dom = hv.domain(domain)?;
    dom.ensure_running()?;
    let mem = dom.open_memory(source.into())?;
    let regs = dom.registers()?;
    let mut view = discover(&*mem, &regs).with_context(|| format!("domain {}", dom.name))?;
    let bounds = vigil::linux::layout::bound_view(&load_profiles(cli), &*mem, &mut view);
    if let Err(why) = &bounds {
        eprintln!(
            "vigil: warning: {}: kernel text and rodata are classed by page permission only ({why}): \
             pages the kernel freed after boot may still be protected as content; add a profile of \
             this kernel (vigil profile build) to bound them",
            dom.name
        );
    }
    let id = DomainId { name: dom.name.clone(), uuid: dom.uuid.clone() };
    let (mut b, originals) =
        Baseline::build_keeping(&*mem, id, view.identification.clone(), regs, &view, &view.regions)
            .with_context(|| format!("domain {}: hashing the kernel", dom.name))?;
    b.run = Some(dom.run()?);
    let proof = vigil::linux::reference::prove(
        &*mem,
        &view,
        &load_profiles(cli),
        None,
        &vigil::linux::patch::WallClock,
    );
    b.reference = Some(proof.check);
    // The hooks now, to show in a diff those added since.
    match Inventory::of_guest(&load_profiles(cli), &*mem, &view, view.identification.image_base) {
        Ok((inventory, _)) => b.hooks = Some(inventory.summaries()),
        Err(why) => eprintln!("vigil: warning: {}: the baseline keeps no hooks: {why}", dom.name),
    }
    let path = output.map(Path::to_path_buf).unwrap_or_else(|| default_baseline_path(cli, &dom));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // The original pages first: a baseline never points at missing ones.
    originals.save(&Originals::path_for(&path))?;
    b.save(&path)?;
    let mut out = std::io::stdout().lock();
    if cli.format == Format::Json {
        let regions: Vec<_> = b
            .regions
            .iter()
            .map(|r| serde_json::json!({ "name": r.name, "pages": r.pages.len(), "root": vigil::integrity::baseline::to_hex(&r.root) }))
            .collect();
        let v = serde_json::json!({ "domain": b.domain, "path": path, "kernel": b.kernel, "source": b.source, "regions": regions, "reference": b.reference });
        serde_json::to_writer_pretty(&mut out, &v)?;
        writeln!(out)?;
    } else {
        writeln!(
            out,
            "baseline of {} ({}) written to {}",
            b.domain.name,
            b.domain.uuid,
            path.display()
        )?;
        writeln!(
            out,
            "kernel image at {} (guest-physical {}), found by {} from CR3 {:#x} of vCPU {}; memory read by {}",
            b.kernel.image_base,
            b.kernel.image_base_gpa,
            b.kernel.method,
            b.kernel.cr3,
            b.kernel.vcpu,
            b.source
        )?;
        if let Ok(bounds) = &bounds {
            writeln!(out, "regions bounded by the kernel's layout: {bounds}")?;
        }
        for r in &b.regions {
            writeln!(
                out,
                "  {:16} {:6} pages  blake3 {}",
                r.name,
                r.pages.len(),
                vigil::integrity::baseline::to_hex(&r.root)
            )?;
        }
        if let Some(rc) = &b.reference {
            writeln!(out, "reference {}: {}", rc.state.as_str(), rc.detail)?;
            for f in &rc.mismatches {
                print_finding(&mut out, f)?;
            }
        }
        if !view.unreadable_tables.is_empty() {
            writeln!(
                out,
                "warning: {} page-table pointers of the kernel image led outside guest RAM",
                view.unreadable_tables.len()
            )?;
        }
    }
    // A baseline that differs from the vendor's image is written (it is
    // the guest as it is) but says so in its exit status.
    let mismatch =
        b.reference.as_ref().is_some_and(|r| r.state == vigil::integrity::ReferenceState::Mismatch);
    Ok(if mismatch { EXIT_VIOLATIONS } else { EXIT_OK })
}

/// A live domain's baseline: the one given, or the stored one; refused
/// when it is missing or of another domain.
fn domain_baseline(
    cli: &Cli,
    dom: &GuestDomain,
    given: Option<&Path>,
) -> anyhow::Result<(PathBuf, Baseline)> {
    let path = given.map(Path::to_path_buf).unwrap_or_else(|| default_baseline_path(cli, dom));
    if given.is_none() && !path.exists() {
        bail!(
            "no baseline for domain {} at {}: run `vigil baseline {}` first",
            dom.name,
            path.display(),
            dom.name
        );
    }
    let b = Baseline::load(&path)?;
    if b.domain.uuid != dom.uuid {
        bail!(
            "baseline {} is of domain {} ({}), not of {} ({})",
            path.display(),
            b.domain.name,
            b.domain.uuid,
            dom.name,
            dom.uuid
        );
    }
    // Whether the guest booted again is the hypervisor's to say: another
    // QEMU process than the baseline's is a new start (or restore, or
    // migration) of the domain. The same process with the kernel moved is
    // judged page by page (remap violations), since a reset cannot be told
    // from the guest moving its own kernel after the fact.
    if let Some(then) = &b.run {
        let now = dom.run()?;
        if !then.same_as(&now) && now.incoming {
            // A restore or an incoming migration holds the same boot: checked.
            eprintln!(
                "vigil: warning: {} was restored or migrated in since the baseline ({now}): checking against it",
                dom.name
            );
        } else if !then.same_as(&now) {
            bail!(
                "the baseline {} is from another run of domain {}: it was taken under {then}, and libvirt \
                 has started the domain since ({now} runs it now); take a new baseline with `vigil baseline {}`",
                path.display(),
                dom.name,
                dom.name
            );
        }
    }
    Ok((path, b))
}

fn check_domain(
    cli: &Cli,
    domain: &str,
    baseline: Option<&Path>,
    source: Source,
) -> anyhow::Result<u8> {
    let hv = Hypervisor::connect(cli.uri())?;
    let dom = hv.domain(domain)?;
    dom.ensure_running()?;
    let (path, b) = domain_baseline(cli, &dom, baseline)?;
    let mem = dom.open_memory(source.into())?;
    let regs = dom.registers()?;
    let originals = load_originals(&path, &b);
    let profiles = load_profiles(cli);
    let report = examined(
        &dom.name,
        examine_once(&b, &originals, &*mem, &regs, &profiles, false, &hook_policy(cli)),
    )?
    .report;
    let mut out = std::io::stdout().lock();
    if cli.format == Format::Json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    } else {
        print_report(&mut out, &report, &path)?;
    }
    Ok(if report.check.intact { EXIT_OK } else { EXIT_VIOLATIONS })
}

/// Where `vigil profile build` writes a profile of `release` when not told:
/// the search path's own directory for built profiles, or, when that cannot
/// be made or written (not root), `./guest-profiles`, with a note saying
/// how to use it.
fn built_profile_path(cli: &Cli, release: &str) -> PathBuf {
    let file = format!("{release}.profile");
    let dir = vigil::paths::built_profiles(&state_dir(cli));
    let writable = std::fs::create_dir_all(&dir).and_then(|()| {
        let probe = dir.join(format!(".{file}.probe"));
        std::fs::write(&probe, b"").and_then(|()| std::fs::remove_file(&probe))
    });
    match writable {
        Ok(()) => dir.join(file),
        Err(e) => {
            let here = PathBuf::from("guest-profiles");
            eprintln!(
                "vigil: note: {} cannot be written ({e}), so the profile goes to {}: use it with \
                 `--profiles {}`, or copy it (and its .reference) to {} as root, where `vigil check` \
                 and the daemon look",
                dir.display(),
                here.join(&file).display(),
                here.display(),
                dir.display()
            );
            here.join(file)
        }
    }
}

fn profile_build(cli: &Cli, vmlinuz: &Path, output: Option<&Path>) -> anyhow::Result<u8> {
    let bytes = std::fs::read(vmlinuz).with_context(|| format!("reading {}", vmlinuz.display()))?;
    let name = vmlinuz.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let p = vigil::linux::profile::Profile::build(&bytes, &name)
        .with_context(|| format!("{}", vmlinuz.display()))?;
    let path = output.map(Path::to_path_buf).unwrap_or_else(|| built_profile_path(cli, &p.release));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let (vmlinux, _) = vigil::linux::image::vmlinux(&bytes)?;
    let at = |n: &str| p.symbol(n).map(|s| s.addr);
    let (Some(start), Some(end)) = (at("__start_rodata"), at("__end_rodata")) else {
        bail!("{}: no __start_rodata and __end_rodata in its symbols", vmlinuz.display());
    };
    let r = vigil::linux::reference::Reference::from_vmlinux(&vmlinux, (start, end))
        .with_context(|| format!("{}: its reference", vmlinuz.display()))?;
    let ref_path = path.with_extension("reference");
    let stored = vigil::linux::reference::ReferenceFile::write(&r)
        .with_context(|| format!("{}: its reference", vmlinuz.display()))?;
    // The reference first, and each whole or not at all: a daemon picks
    // up a profile as soon as it appears on its search path.
    write_whole(&ref_path, &stored)?;
    write_whole(&path, p.to_text().as_bytes())?;
    println!(
        "reference written to {}: {} section(s), {} bytes ({} stored), {} relocations",
        ref_path.display(),
        r.sections.len(),
        r.bytes(),
        stored.len(),
        r.relocs.abs64.len() + r.relocs.abs32.len() + r.relocs.inv32.len()
    );
    println!(
        "profile of {} written to {}: {} symbols, {} + {} syscall table entries",
        p.release,
        path.display(),
        p.symbols().len(),
        p.syscall_tables()[0].1.len(),
        p.syscall_tables()[1].1.len()
    );
    Ok(EXIT_OK)
}

/// Writes `bytes` to `path` through a temporary file beside it, renamed
/// into place: a reader sees the old file or the new one, never a part.
fn write_whole(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// `vigil profile list`: the profiles on the search path, what became of
/// each, and (with `domains`) which running domain's kernel each matches.
fn profile_list(cli: &Cli, domains: bool, source: Source) -> anyhow::Result<u8> {
    use vigil::linux::profile::{Found, list_dirs};
    let dirs = profile_dirs(cli);
    let listed = list_dirs(&dirs);
    let used: Vec<vigil::linux::profile::Profile> = listed
        .iter()
        .filter_map(|l| match &l.state {
            Found::Used(p) => Some((**p).clone()),
            _ => None,
        })
        .collect();
    // Each running domain: the release of the profile its kernel matches,
    // or why none does.
    let mut matched: Vec<serde_json::Value> = Vec::new();
    let mut failed = None;
    if domains {
        match Hypervisor::connect(cli.uri()).and_then(|hv| Ok((hv.domains()?, hv))) {
            Err(e) => {
                failed = Some(format!("the domains could not be listed: {}", error_chain(&e)))
            }
            Ok((list, hv)) => {
                for d in list.iter().filter(|d| d.state == "running") {
                    matched.push(match_domain(&hv, &d.name, source, &used));
                }
            }
        }
    }
    // (release, state, why)
    let state_of = |l: &vigil::linux::profile::Listed| match &l.state {
        Found::Used(p) => (p.release.clone(), "used", String::new()),
        Found::Shadowed(by) => (String::new(), "shadowed", format!("by {}", by.display())),
        Found::Refused(why) => (String::new(), "refused", why.clone()),
    };
    let mut out = std::io::stdout().lock();
    if cli.format == Format::Json {
        let files: Vec<serde_json::Value> = listed
            .iter()
            .map(|l| {
                let (release, state, why) = state_of(l);
                serde_json::json!({ "file": l.path, "release": release, "state": state, "why": why })
            })
            .collect();
        serde_json::to_writer_pretty(
            &mut out,
            &serde_json::json!({
                "search_path": dirs,
                "profiles": files,
                "domains": matched,
                "domains_error": failed,
            }),
        )?;
        writeln!(out)?;
    } else {
        writeln!(out, "search path (first match of a release wins):")?;
        for d in &dirs {
            let n = listed.iter().filter(|l| l.path.parent() == Some(d.as_path())).count();
            let what = if d.is_dir() { format!("{n} profile file(s)") } else { "missing".into() };
            writeln!(out, "  {}  ({what})", d.display())?;
        }
        writeln!(out, "{:36} {:10} FILE", "RELEASE", "STATE")?;
        for l in &listed {
            let (release, state, why) = state_of(l);
            let why = if why.is_empty() { why } else { format!("  ({why})") };
            writeln!(out, "{release:36} {state:10} {}{why}", l.path.display())?;
        }
        if domains && failed.is_none() {
            writeln!(out, "{:24} PROFILE", "DOMAIN")?;
            for m in &matched {
                let profile = m["profile"].as_str().map(str::to_owned).unwrap_or_else(|| {
                    format!("none: {}", m["why"].as_str().unwrap_or("no profile matches"))
                });
                writeln!(out, "{:24} {profile}", m["domain"].as_str().unwrap_or("?"))?;
            }
        }
    }
    if let Some(why) = failed {
        eprintln!("vigil: error: {why}");
        return Ok(EXIT_ERROR);
    }
    Ok(EXIT_OK)
}

/// Which of `profiles` the kernel of running domain `name` matches, or why
/// none does (with the kernel's own banner, when one is found).
fn match_domain(
    hv: &Hypervisor,
    name: &str,
    source: Source,
    profiles: &[vigil::linux::profile::Profile],
) -> serde_json::Value {
    let found = (|| -> anyhow::Result<Result<String, String>> {
        let dom = hv.domain(name)?;
        let mem = dom.open_memory(source.into())?;
        let regs = dom.registers()?;
        let view = discover(&*mem, &regs).context("finding the kernel")?;
        let base = view.identification.image_base;
        if let Some(m) = vigil::linux::semantic::match_profile(profiles, &*mem, &view, base) {
            return Ok(Ok(m.profile.release.clone()));
        }
        let banner = view
            .regions
            .iter()
            .find(|r| r.kind == vigil::integrity::RegionKind::ReadOnlyData)
            .and_then(|ro| vigil::linux::semantic::guest_banner(&*mem, ro));
        Ok(Err(match banner {
            Some(b) => format!("no profile matches; the guest says \"{b}\""),
            None => "no profile matches, and the guest's banner was not found".into(),
        }))
    })();
    match found {
        Ok(Ok(release)) => serde_json::json!({ "domain": name, "profile": release }),
        Ok(Err(why)) => serde_json::json!({ "domain": name, "profile": null, "why": why }),
        Err(e) => serde_json::json!({
            "domain": name,
            "profile": null,
            "why": format!("not read: {}", e.chain().map(|c| c.to_string()).collect::<Vec<_>>().join(": ")),
        }),
    }
}

/// One request to the daemon; its answer when it said ok.
fn control_request(cli: &Cli, req: &Request) -> anyhow::Result<serde_json::Value> {
    let mut answer =
        vigil::daemon::control::request(&cli.control_socket(), req).map_err(anyhow::Error::msg)?;
    if answer["ok"] != true {
        bail!("the daemon refused: {}", answer["error"].as_str().unwrap_or("no reason given"));
    }
    Ok(answer["result"].take())
}

fn control(cli: &Cli, req: &Request) -> anyhow::Result<u8> {
    let answer =
        vigil::daemon::control::request(&cli.control_socket(), req).map_err(anyhow::Error::msg)?;
    if answer["ok"] != true {
        bail!("the daemon refused: {}", answer["error"].as_str().unwrap_or("no reason given"));
    }
    let mut out = std::io::stdout().lock();
    if cli.format == Format::Json || *req != Request::Status {
        serde_json::to_writer_pretty(&mut out, &answer)?;
        writeln!(out)?;
        return Ok(EXIT_OK);
    }
    let list = answer["domains"].as_array().cloned().unwrap_or_default();
    writeln!(
        out,
        "vigil daemon on {} ({}), {} domain(s)",
        answer["host"].as_str().unwrap_or("?"),
        answer["connect"].as_str().unwrap_or("?"),
        list.len()
    )?;
    writeln!(out, "{:24} {:12} {:>10}  {:30}  DETAIL", "DOMAIN", "STATE", "OPEN", "LAST CHECK")?;
    for d in &list {
        let s = |k: &str| d[k].as_str().unwrap_or("").to_owned();
        writeln!(
            out,
            "{:24} {:12} {:>10}  {:30}  {}",
            s("name"),
            s("state"),
            d["open_violations"],
            s("last_check"),
            s("detail")
        )?;
    }
    Ok(EXIT_OK)
}

/// The baseline's original pages, or none (with a warning) when missing.
fn load_originals(baseline: &Path, b: &Baseline) -> Originals {
    match Originals::load(&Originals::path_for(baseline), b) {
        Ok(o) => o,
        Err(e) => {
            eprintln!(
                "vigil: warning: {}: without the baseline's original pages, kernel patches cannot be told from attacks",
                error_chain(&e)
            );
            Originals::default()
        }
    }
}

fn load_profiles(cli: &Cli) -> Vec<vigil::linux::profile::Profile> {
    let (profiles, refused) = vigil::linux::profile::load_dir(&profile_dirs(cli));
    for (path, why) in refused {
        eprintln!("vigil: warning: guest profile {} refused: {why}", path.display());
    }
    profiles
}

/// An examination's result, its warnings said on stderr, its errors worded.
fn examined(
    name: &str,
    r: Result<vigil::linux::session::Examined, ExamineError>,
) -> anyhow::Result<vigil::linux::session::Examined> {
    match r {
        Ok(e) => {
            for w in &e.warnings {
                eprintln!("vigil: warning: {name}: {w}");
            }
            Ok(e)
        }
        Err(e) => Err(e).with_context(|| format!("domain {name}")),
    }
}

/// `vigil diff`: live against a domain, or on a dump file.
fn diff(cli: &Cli, a: &DiffArgs) -> anyhow::Result<u8> {
    if a.daemon {
        let Some(domain) = &a.domain else { bail!("--daemon needs the DOMAIN the daemon watches") };
        if a.dump.is_some() || a.baseline.is_some() {
            bail!(
                "--daemon diffs against the daemon's own baseline: --dump and --baseline do not apply"
            );
        }
        let v = control_request(cli, &Request::Diff { domain: domain.clone() })?;
        let mut d: vigil::linux::diff::Diff = serde_json::from_value(v)
            .context("the daemon's diff is not one this vigil reads (versions differ?)")?;
        if let Some(r) = &a.region {
            d.changes.retain(|c| &c.region == r);
        }
        return print_diff(cli, &d);
    }
    let (b, path, mem, regs, source): (
        Baseline,
        PathBuf,
        Box<dyn vigil::memory::GuestMemory>,
        _,
        String,
    ) = match (&a.dump, &a.domain) {
        (Some(dump), _) => {
            let Some(path) = a.baseline.clone() else {
                bail!("--dump needs --baseline FILE: the baseline the dump is compared with");
            };
            let b = Baseline::load(&path)?;
            let shown = dump.display().to_string();
            let elf =
                vigil::memory::is_elf(dump).with_context(|| format!("{shown}: cannot read"))?;
            let (mem, regs): (Box<dyn vigil::memory::GuestMemory>, Vec<_>) = if elf {
                let core = vigil::memory::ElfCore::open(dump)?;
                // EFER is not in QEMU's notes: taken as the baseline has it.
                let mut regs = vigil::qemu::dump_registers(&core.cpu_notes)
                    .with_context(|| format!("{shown}: its vCPU notes"))?;
                for r in &mut regs {
                    r.efer = b.registers.iter().find(|o| o.index == r.index).map_or(0, |o| o.efer);
                }
                if regs.is_empty() {
                    bail!(
                        "{shown}: the ELF core has no QEMU CPU notes, so no CR3 to find the kernel with"
                    );
                }
                (Box::new(core), regs)
            } else {
                let raw = vigil::memory::RawDump::open(dump)
                    .with_context(|| format!("{shown}: cannot read"))?;
                // A raw dump has no registers: the baseline's (the same boot) lead to the kernel.
                (Box::new(raw), b.registers.clone())
            };
            let source = format!("{} {shown}", if elf { "ELF core" } else { "raw dump" });
            (b, path, mem, regs, source)
        }
        (None, Some(domain)) => {
            let hv = Hypervisor::connect(cli.uri())?;
            let dom = hv.domain(domain)?;
            dom.ensure_running()?;
            let (path, b) = domain_baseline(cli, &dom, a.baseline.as_deref())?;
            let mem = dom.open_memory(SourceChoice::Auto)?;
            let regs = dom.registers()?;
            let source = format!("live {}", mem.kind());
            (b, path, Box::new(mem), regs, source)
        }
        (None, None) => {
            bail!("name a DOMAIN to diff live, or give --dump FILE and --baseline FILE")
        }
    };
    let originals = load_originals(&path, &b);
    let profiles = load_profiles(cli);
    let e = examined(
        &b.domain.name.clone(),
        examine_once(&b, &originals, &*mem, &regs, &profiles, true, &hook_policy(cli)),
    )?;
    let mut changes = e.changes;
    if let Some(r) = &a.region {
        changes.retain(|c| &c.region == r);
    }
    let d = vigil::linux::diff::Diff::of(
        &e.report,
        &b,
        &path.display().to_string(),
        source,
        changes,
        e.hooks.as_ref(),
    );
    print_diff(cli, &d)
}

/// Writes a diff in the chosen format; the exit status says whether it is intact.
fn print_diff(cli: &Cli, d: &vigil::linux::diff::Diff) -> anyhow::Result<u8> {
    let mut out = std::io::stdout().lock();
    if cli.format == Format::Json {
        serde_json::to_writer_pretty(&mut out, d)?;
        writeln!(out)?;
    } else if cli.format == Format::Html {
        write!(out, "{}", vigil::linux::diff::render_html(d))?;
    } else {
        use std::io::IsTerminal;
        let colour = if std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none() {
            vigil::linux::diff::Colour::Yes
        } else {
            vigil::linux::diff::Colour::No
        };
        write!(out, "{}", vigil::linux::diff::render_text(d, colour, 20))?;
    }
    Ok(if d.intact { EXIT_OK } else { EXIT_VIOLATIONS })
}

fn print_report(out: &mut impl Write, kr: &KernelReport, path: &Path) -> std::io::Result<()> {
    let (r, k) = (&kr.check, &kr.kernel);
    let verdict = if r.intact { "INTACT" } else { "VIOLATIONS" };
    writeln!(
        out,
        "{verdict}: domain {} ({}), {} violation(s), {} info",
        r.domain,
        r.uuid,
        r.violations.len(),
        r.info.len()
    )?;
    writeln!(
        out,
        "baseline {} of {}, checked {} through {}",
        path.display(),
        r.baseline_created,
        r.checked,
        r.source
    )?;
    match &k.profile {
        Some(p) => writeln!(
            out,
            "guest profile: {p} (symbols and kernel records from the vendor's image)"
        )?,
        None => writeln!(
            out,
            "guest profile: none matches (`vigil profile list` shows the kernel's banner; `vigil profile build` makes one)"
        )?,
    }
    if let Some(state) = &k.reference {
        writeln!(
            out,
            "reference: the baseline's kernel was {state} against the vendor's image when taken"
        )?;
    }
    if k.patched_sites > 0 {
        let kinds: Vec<String> = k.patches.iter().map(|(k, n)| format!("{n} {k}")).collect();
        writeln!(
            out,
            "kernel patches: {} site(s) differ from the baseline, each a patch the kernel's own records allow ({})",
            k.patched_sites,
            kinds.join(", ")
        )?;
    }
    writeln!(out)?;
    writeln!(out, "{:20} {:>7} {:>8} {:>5}  STATUS", "REGION", "PAGES", "CHANGED", "INFO")?;
    for s in &r.regions {
        let status = if s.intact { "intact" } else { "CHANGED" };
        writeln!(
            out,
            "{:20} {:>7} {:>8} {:>5}  {status}",
            s.name, s.pages, s.changed_pages, s.info
        )?;
    }
    for (title, list) in [("VIOLATIONS", &r.violations), ("INFO", &r.info)] {
        if list.is_empty() {
            continue;
        }
        writeln!(out, "\n{title}")?;
        // A terminal gets the first findings of each region and kind; JSON has all.
        let mut shown: std::collections::HashMap<(&str, FindingKind), usize> =
            std::collections::HashMap::new();
        let mut hidden = 0usize;
        for f in list {
            let n = shown.entry((f.region.as_str(), f.kind)).or_default();
            *n += 1;
            if *n <= TEXT_FINDINGS_PER_GROUP {
                print_finding(out, f)?;
            } else {
                hidden += 1;
            }
        }
        if hidden > 0 {
            writeln!(out, "  ... and {hidden} more like these (--format json lists every one)")?;
        }
    }
    Ok(())
}

/// Findings of one region and kind printed in text output.
const TEXT_FINDINGS_PER_GROUP: usize = 10;

fn print_finding(out: &mut impl Write, f: &Finding) -> std::io::Result<()> {
    let kind = serde_json::to_value(f.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let place = match (f.page, f.vcpu) {
        (Some(p), _) => format!("page {p:<6} gva {} gpa {}", f.gva, f.gpa),
        (None, Some(v)) => format!("vCPU {v}"),
        (None, None) => format!("gva {} gpa {}", f.gva, f.gpa),
    };
    writeln!(out, "  {:14} {:10} {place}  {}", f.region, kind, f.detail)?;
    if let Some(sym) = &f.symbol {
        writeln!(out, "  {:14} {:10} at {sym}", "", "")?;
    }
    if !f.before.is_empty() || !f.after.is_empty() {
        writeln!(out, "  {:14} {:10} before {}  after {}", "", "", f.before, f.after)?;
    }
    Ok(())
}

/// `vigil verify`: the kernel's pages against the vendor's image, live or
/// in an ELF core.
fn hook_policy(cli: &Cli) -> vigil::linux::hooks::HookPolicy {
    vigil::linux::hooks::HookPolicy { allow: cli.allow_hook.clone() }
}

fn hooks(cli: &Cli, domain: &str, source: Source) -> anyhow::Result<u8> {
    use vigil::integrity::Severity;
    let hv = Hypervisor::connect(cli.uri())?;
    let dom = hv.domain(domain)?;
    dom.ensure_running()?;
    let mem = dom.open_memory(source.into())?;
    let regs = dom.registers()?;
    let name = &dom.name;
    let view = discover(&*mem, &regs).with_context(|| format!("{name}: finding the kernel"))?;
    let profiles = load_profiles(cli);
    let (inventory, release) =
        Inventory::of_guest(&profiles, &*mem, &view, view.identification.image_base)
            .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    let findings = hook_policy(cli).judge(&inventory);
    let violations = findings.iter().filter(|f| f.severity == Severity::Violation).count();
    let mut out = std::io::stdout().lock();
    if cli.format == Format::Json {
        serde_json::to_writer_pretty(
            &mut out,
            &serde_json::json!({
                "domain": name,
                "profile": release,
                "hooks": inventory.hooks,
                "bpf": inventory.bpf,
                "unread": inventory.unread,
                "findings": findings,
            }),
        )?;
        writeln!(out)?;
    } else {
        writeln!(out, "{name}: {} hook(s), profile {release}", inventory.hooks.len())?;
        for h in &inventory.hooks {
            let flags = if h.flags.is_empty() {
                String::new()
            } else {
                format!(" [{}]", h.flags.join("|"))
            };
            writeln!(
                out,
                "  {} at {:#x}{flags}{}: {}",
                h.mechanism.as_str(),
                h.record,
                if h.redirects { " (can redirect)" } else { "" },
                h.hooked_text()
            )?;
            for c in &h.callbacks {
                writeln!(out, "      {:14} {:#x}  {}", c.role, c.addr, c.owner)?;
            }
            for why in &h.forged {
                writeln!(out, "      FORGED: {why}")?;
            }
        }
        if !inventory.bpf.is_empty() {
            let names: Vec<&str> = inventory.bpf.iter().map(|b| b.name.as_str()).collect();
            writeln!(out, "  BPF images: {}", names.join(", "))?;
        }
        for u in &inventory.unread {
            writeln!(out, "  not read: {u}")?;
        }
        for f in &findings {
            let sev = if f.severity == Severity::Violation { "VIOLATION" } else { "info" };
            writeln!(out, "{sev}: {}", f.detail)?;
        }
        if findings.is_empty() {
            writeln!(out, "no hook owned by a module or by unknown code")?;
        }
    }
    Ok(if violations > 0 { 1 } else { EXIT_OK })
}

fn verify(
    cli: &Cli,
    domain: Option<&str>,
    dump: Option<&Path>,
    reference: Option<&Path>,
) -> anyhow::Result<u8> {
    use vigil::integrity::ReferenceState;
    let (name, mem, regs): (String, Box<dyn vigil::memory::GuestMemory>, Vec<_>) = match (
        dump, domain,
    ) {
        (Some(dump), _) => {
            let shown = dump.display().to_string();
            if !vigil::memory::is_elf(dump).with_context(|| format!("{shown}: cannot read"))? {
                bail!(
                    "{shown}: not an ELF core; verify needs the vCPU registers of `virsh dump --memory-only --format elf`"
                );
            }
            let core = vigil::memory::ElfCore::open(dump)?;
            let mut regs = vigil::qemu::dump_registers(&core.cpu_notes)
                .with_context(|| format!("{shown}: its vCPU notes"))?;
            if regs.is_empty() {
                bail!(
                    "{shown}: the ELF core has no QEMU CPU notes, so no CR3 to find the kernel with"
                );
            }
            // EFER is not in QEMU's notes: a 64-bit kernel runs in long mode with NX.
            for r in &mut regs {
                r.efer = EFER_LONG_MODE_NX;
            }
            (shown, Box::new(core), regs)
        }
        (None, Some(domain)) => {
            let hv = Hypervisor::connect(cli.uri())?;
            let dom = hv.domain(domain)?;
            dom.ensure_running()?;
            let mem = dom.open_memory(SourceChoice::Auto)?;
            let regs = dom.registers()?;
            (dom.name.clone(), Box::new(mem), regs)
        }
        (None, None) => bail!("name a DOMAIN to verify live, or give --dump CORE"),
    };
    let mut view = discover(&*mem, &regs).with_context(|| format!("{name}: finding the kernel"))?;
    let profiles = load_profiles(cli);
    if let Err(e) = vigil::linux::layout::bound_view(&profiles, &*mem, &mut view) {
        eprintln!("vigil: warning: {name}: regions not bounded by the layout: {e}");
    }
    let proof = vigil::linux::reference::prove(
        &*mem,
        &view,
        &profiles,
        reference,
        &vigil::linux::patch::WallClock,
    );
    let c = &proof.check;
    let mut kinds: std::collections::BTreeMap<String, u64> = Default::default();
    for j in proof.verification.iter().flat_map(|v| &v.differences) {
        let on = j.diff.sites.iter().find(|s| (s.addr..s.addr + u64::from(s.len)).contains(&j.at));
        let kind = on.map_or("off any rewrite site", |s| s.kind.name());
        *kinds.entry(format!("{kind}: {}", j.judgement.name())).or_default() += 1;
    }
    let mut out = std::io::stdout().lock();
    if cli.format == Format::Json {
        let v = serde_json::json!({ "domain": name, "reference": c, "runs": kinds });
        serde_json::to_writer_pretty(&mut out, &v)?;
        writeln!(out)?;
    } else {
        writeln!(out, "{name}: reference {}: {}", c.state.as_str(), c.detail)?;
        for (kind, runs) in &kinds {
            writeln!(out, "  {kind}: {runs} run(s)")?;
        }
        for f in &c.mismatches {
            print_finding(&mut out, f)?;
        }
    }
    Ok(match c.state {
        ReferenceState::Verified => EXIT_OK,
        ReferenceState::Mismatch => EXIT_VIOLATIONS,
        ReferenceState::Unavailable => {
            eprintln!("vigil: {name}: nothing verified: {}", c.detail);
            EXIT_ERROR
        }
    })
}
