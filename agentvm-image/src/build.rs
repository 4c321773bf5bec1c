//! Building a guest image (kernel + initramfs) that the agentvm backends
//! boot directly (`-kernel vmlinuz -initrd initramfs.cpio.gz -append
//! <cmdline>`): [`run`], behind `cargo xtask build-image` and
//! `agentvm image build`.
//!
//! Output, in `<out>/<name>/`: `vmlinuz`, `initramfs.cpio.gz`, `manifest.json`,
//! and for the `agent` image (or `--rootfs`, `--with`) `rootfs.erofs`: a
//! Debian root file system with agent recipes (`images/recipes/`),
//! which the initramfs init mounts under a tmpfs overlay and switch_roots to.
//! The manifest is written last and removed first on a rebuild, so a
//! directory with a manifest always holds a complete image.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

use crate::initramfs::Tree;
use crate::manifest::{
    self, BusyboxInfo, FileInfo, GuestInfo, Inputs, KernelInfo, Manifest, ModuleInfo,
    RootfsManifest, UserInfo,
};
use crate::progress::{Event, Progress};
use crate::rootfs::{self, RootfsFormat, RootfsInputs};
use crate::source::SourceTree;
use crate::util::{rfc3339_utc, sha256_file, sha256_hex, write_atomic};
use crate::{boot_header, busybox, guest, initramfs, kernel, modules, recipe, Error};

/// Kernel command line for the image. `quiet` keeps the serial console to
/// the init script's and the agent's lines; drop it by hand to debug a boot.
///
/// `tsc=reliable`: under TCG the guest TSC is the host's TSC (constant), but
/// the clocksource watchdog compares it with jiffies, which lag when the host
/// is busy, marks it unstable and falls back to the 4 ms `refined-jiffies`
/// clocksource. Harmless under KVM (kvm-clock is preferred there).
///
/// Not here because it is host-specific: under TCG the backend should append
/// `tsc_early_khz=<host TSC kHz>`. Without it, when the host is loaded, the
/// PIT calibration fails ("tsc: Unable to calibrate against PIT ... Marking
/// TSC unstable") and `-M microvm` (no HPET/ACPI PM timer to fall back to)
/// hangs for good before userspace.
pub const CMDLINE: &str = "console=ttyS0 panic=1 quiet tsc=reliable";
/// The virtio-serial port the guest agent serves (see images/init).
pub const VIRTIO_PORT: &str = "org.agentvm.ctl";
/// Where the guest agent lives in the image.
pub const GUEST_PATH: &str = "usr/bin/agentvm-guest";
/// Where the DHCP wrapper (`images/agentvm-dhcp`) lives in the image; the
/// init copies it into a root file system at the same path.
pub const DHCP_PATH: &str = "usr/local/sbin/agentvm-dhcp";

/// File name of the kernel in an image directory.
pub const VMLINUZ: &str = "vmlinuz";
/// File name of the initramfs in an image directory.
pub const INITRAMFS: &str = "initramfs.cpio.gz";
/// File name of the manifest, written last: its presence means a complete image.
pub const MANIFEST: &str = "manifest.json";
/// The image built when no name is given: busybox userland, no root file system.
pub const DEFAULT_IMAGE: &str = "default";
/// The Debian kernel package taken by default.
pub const DEFAULT_KERNEL_PACKAGE: &str = kernel::DEFAULT_PACKAGE;
/// The image name that gets a Debian root file system by default.
pub const AGENT_IMAGE: &str = "agent";
/// Serial number of the root file system disk (the backends set it; the
/// guest's init finds the disk by `/sys/block/vd*/serial`, whatever its name).
pub const ROOTFS_SERIAL: &str = "agentvm-rootfs";

/// The options of a build: the flags of `cargo xtask build-image` and
/// `agentvm image build` (with the `clap` feature this is their
/// `clap::Args`). Directories not given default to the source tree's
/// `target/agentvm/` ([`crate::source`]).
#[derive(Debug, Clone)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
// The field docs are the commands' --help text, written for a terminal.
#[allow(rustdoc::invalid_html_tags, rustdoc::broken_intra_doc_links)]
pub struct BuildImageArgs {
    /// Image name, given as an argument instead of --name.
    #[cfg_attr(feature = "clap", arg(value_name = "NAME", conflicts_with = "name"))]
    pub name_arg: Option<String>,
    /// Image name: the output goes to <out>/<name>/. `agent` gets a Debian
    /// root file system (see --rootfs).
    #[cfg_attr(
        feature = "clap",
        arg(long, visible_alias = "image", default_value = DEFAULT_IMAGE)
    )]
    pub name: String,
    /// Build a Debian root file system disk (default for `--name agent`).
    #[cfg_attr(feature = "clap", arg(long))]
    pub rootfs: bool,
    /// Agent recipes to install (images/recipes/<name>.toml), comma separated;
    /// implies --rootfs.
    #[cfg_attr(
        feature = "clap",
        arg(long = "with", value_delimiter = ',', value_name = "RECIPE,...")
    )]
    pub with: Vec<String>,
    /// How the root file system is packed.
    #[cfg_attr(feature = "clap", arg(long, value_enum, default_value_t = RootfsFormat::Erofs))]
    pub rootfs_format: RootfsFormat,
    /// Debian archive URL [default: the host's apt source for bookworm].
    #[cfg_attr(feature = "clap", arg(long, value_name = "URL"))]
    pub mirror: Option<String>,
    /// Output directory: the image goes to <out>/<name>/ [default: for
    /// `agentvm`, the image_dir of the current workspace (what its tests
    /// look in: .config/agentvm.toml, AGENT_VM_IMAGE_DIR, else
    /// <workspace>/target/agentvm/images); for the library and `cargo
    /// xtask`, <source>/target/agentvm/images].
    #[cfg_attr(feature = "clap", arg(long, value_name = "DIR"))]
    pub out: Option<PathBuf>,
    /// Rebuild even if the image is up to date.
    #[cfg_attr(feature = "clap", arg(long))]
    pub force: bool,
    /// Kernel package (metapackage or versioned) to take vmlinuz and modules from.
    #[cfg_attr(feature = "clap", arg(long, default_value = DEFAULT_KERNEL_PACKAGE))]
    pub kernel_package: String,
    /// Use this static guest agent binary instead of building agentvm-guest
    /// (e.g. a stand-in while the agent is being written).
    #[cfg_attr(feature = "clap", arg(long, value_name = "PATH"))]
    pub guest_bin: Option<PathBuf>,
    /// Static busybox to pack [default: /bin/busybox from busybox-static].
    #[cfg_attr(
        feature = "clap",
        arg(long, value_name = "PATH", env = "AGENTVM_BUSYBOX")
    )]
    pub busybox: Option<PathBuf>,
    /// Init script [default: <source>/images/init].
    #[cfg_attr(feature = "clap", arg(long, value_name = "PATH"))]
    pub init: Option<PathBuf>,
    /// Download/unpack cache [default: <source>/target/agentvm/cache].
    #[cfg_attr(feature = "clap", arg(long, value_name = "DIR"))]
    pub cache: Option<PathBuf>,
    /// The agentvm source tree that has the agentvm-guest crate and
    /// images/{init,recipes} [default: the checkout this program was built
    /// from].
    #[cfg_attr(
        feature = "clap",
        arg(long, value_name = "DIR", env = crate::source::SOURCE_DIR_ENV)
    )]
    pub source: Option<PathBuf>,
}

impl BuildImageArgs {
    /// The arguments of a plain `cargo xtask build-image` (the environment
    /// variables that the flags read included).
    pub fn defaults() -> Self {
        Self {
            name_arg: None,
            name: DEFAULT_IMAGE.into(),
            rootfs: false,
            with: Vec::new(),
            rootfs_format: RootfsFormat::Erofs,
            mirror: None,
            out: None,
            force: false,
            kernel_package: kernel::DEFAULT_PACKAGE.into(),
            guest_bin: None,
            busybox: std::env::var_os("AGENTVM_BUSYBOX").map(PathBuf::from),
            init: None,
            cache: None,
            source: std::env::var_os(crate::source::SOURCE_DIR_ENV).map(PathBuf::from),
        }
    }

    /// The arguments of `cargo xtask build-image --name agent --with <recipes>`.
    pub fn agent(with: &[&str]) -> Self {
        Self {
            name: AGENT_IMAGE.into(),
            with: with.iter().map(|s| s.to_string()).collect(),
            ..Self::defaults()
        }
    }

    /// The image's name: the positional argument, else `--name`.
    pub fn image_name(&self) -> &str {
        self.name_arg.as_deref().unwrap_or(&self.name)
    }

    /// Whether this image gets a root file system disk.
    pub fn wants_rootfs(&self) -> bool {
        self.rootfs || self.image_name() == AGENT_IMAGE || !self.with.is_empty()
    }
}

/// What [`run`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The image's directory (`<out>/<name>`).
    pub dir: PathBuf,
    /// The image's content key (a hash of every input).
    pub key: String,
    /// True when the image was already up to date and nothing was written.
    pub up_to_date: bool,
}

/// Builds the image `args` describes (or finds it up to date), reporting
/// progress to `report`. The result lines (`image default built in 12.3s:
/// ...`) are [`Event::Output`] events.
pub fn run(mut args: BuildImageArgs, report: &dyn Fn(Event)) -> Result<Outcome, Error> {
    if let Some(name) = args.name_arg.take() {
        args.name = name;
    }
    check_name(&args.name)?;
    if args.wants_rootfs() && args.name == DEFAULT_IMAGE {
        return Err(Error::RootfsForDefault {
            with: args.with.join(","),
        });
    }
    let source = SourceTree::new(args.source.as_deref());
    // Needed by the steps below; checked first so a missing source tree is
    // one clear error, not a failed cargo or file read.
    let init_path = match &args.init {
        Some(path) => path.clone(),
        None => source.init_script()?,
    };
    if args.guest_bin.is_none() {
        source.guest_crate()?;
    }
    let recipes_dir = if args.wants_rootfs() {
        Some(source.recipes_dir()?)
    } else {
        None
    };
    Ok(build(
        &args,
        &source,
        &init_path,
        recipes_dir.as_deref(),
        report,
    )?)
}

fn build(
    args: &BuildImageArgs,
    source: &SourceTree,
    init_path: &Path,
    recipes_dir: Option<&Path>,
    report: &dyn Fn(Event),
) -> Result<Outcome> {
    let root = source.root();
    let agentvm_dir = root.join("target").join("agentvm");
    let out_dir = args
        .out
        .clone()
        .unwrap_or_else(|| agentvm_dir.join("images"))
        .join(&args.name);
    let cache = args
        .cache
        .clone()
        .unwrap_or_else(|| agentvm_dir.join("cache"));
    let progress = Progress::new(report);

    // 1. Inputs. Each step is cheap when nothing changed.
    let guest_bin = match &args.guest_bin {
        Some(bin) => {
            progress.step(format!("using guest agent {}", bin.display()));
            guest::check(bin)?;
            bin.clone()
        }
        None => {
            let dir = agentvm_dir.join("guest-build");
            progress.step(format!(
                "building guest agent (static, --target {}, target dir {})",
                guest::TARGET,
                dir.display()
            ));
            guest::build(root, &dir)?
        }
    };
    let guest_data =
        fs::read(&guest_bin).with_context(|| format!("read {}", guest_bin.display()))?;
    let guest_sha256 = sha256_hex(&guest_data);

    progress.step("locating busybox-static");
    let bb = busybox::locate(args.busybox.as_deref())?;
    progress.note(format!(
        "{} ({}, {} applets)",
        bb.path.display(),
        bb.version,
        bb.applets.len()
    ));

    let init =
        fs::read(init_path).with_context(|| format!("read init script {}", init_path.display()))?;
    if !init.starts_with(b"#!") {
        bail!("{} must start with a #! line", init_path.display());
    }
    let dhcp_path = root.join("images").join("agentvm-dhcp");
    let dhcp = fs::read(&dhcp_path).with_context(|| format!("read {}", dhcp_path.display()))?;

    progress.step(format!(
        "resolving kernel package {} (apt-cache)",
        args.kernel_package
    ));
    let kinfo = kernel::resolve(&args.kernel_package)?;
    let kernel = kernel::fetch(&kinfo, &cache, &progress)?;

    progress.step("selecting kernel modules (depends= from .modinfo)");
    let extra_modules: Vec<&str> = if args.wants_rootfs() {
        vec!["virtio_blk", args.rootfs_format.fs_type(), "overlay"]
    } else {
        Vec::new()
    };
    let sel = modules::select(&kernel.modules_dir, &extra_modules)?;
    let names: Vec<String> = sel.modules.iter().map(|m| m.name.clone()).collect();
    progress.note(format!("load order: {}", names.join(" ")));
    if !sel.builtin.is_empty() {
        progress.note(format!("built in: {}", sel.builtin.join(" ")));
    }
    if !sel.unavailable.is_empty() {
        progress.note(format!(
            "not in this kernel (skipped): {}",
            sel.unavailable.join(" ")
        ));
    }

    let rootfs_plan = if let Some(recipes_dir) = recipes_dir {
        let recipes = recipe::load(recipes_dir, &args.with)?;
        let mirror = match &args.mirror {
            Some(m) => m.trim_end_matches('/').to_string(),
            None => rootfs::host_mirror(rootfs::SUITE)?,
        };
        let rin = RootfsInputs {
            suite: rootfs::SUITE.into(),
            mirror,
            packages: rootfs::PACKAGES.iter().map(|p| p.to_string()).collect(),
            setup_sha256: sha256_hex(rootfs::SETUP_SCRIPT.as_bytes()),
            format: args.rootfs_format,
            recipes: recipes
                .iter()
                .map(|r| format!("{}={}", r.name, r.sha256))
                .collect(),
        };
        Some((rin, recipes))
    } else {
        None
    };

    let inputs = Inputs {
        format_version: manifest::FORMAT_VERSION,
        guest_sha256: guest_sha256.clone(),
        kernel_package: kinfo.package.clone(),
        kernel_version: kinfo.version.clone(),
        busybox_sha256: bb.sha256.clone(),
        init_sha256: sha256_hex(&init),
        modules: names,
        cmdline: CMDLINE.to_string(),
        rootfs_key: rootfs_plan.as_ref().map(|(r, _)| r.key()),
        helpers: vec![format!("{DHCP_PATH}={}", sha256_hex(&dhcp))],
    };
    let key = inputs.key();

    // 2. Up to date?
    if !args.force {
        if let Some(m) = up_to_date(&out_dir, &key) {
            progress.output(format!(
                "image {} is up to date ({}, key {})",
                args.name,
                out_dir.display(),
                &m.key[..16]
            ));
            return Ok(Outcome {
                dir: out_dir,
                key,
                up_to_date: true,
            });
        }
    }

    // 3. The root file system (cached by its own key: a new guest agent or
    //    kernel does not rebuild it).
    let rootfs_built = match &rootfs_plan {
        Some((rin, recipes)) => {
            progress.step(format!(
                "root file system: Debian {} ({}), recipes [{}], key {}",
                rin.suite,
                rin.format,
                args.with.join(","),
                &rin.key()[..16]
            ));
            Some(rootfs::build(rin, recipes, &cache, &progress)?)
        }
        None => None,
    };

    // 4. Pack.
    progress.step("packing initramfs (newc cpio, gzip)");
    let mut tree = Tree::new();
    for (d, perm) in [
        ("bin", 0o755),
        ("sbin", 0o755),
        ("usr/bin", 0o755),
        ("usr/sbin", 0o755),
        ("dev", 0o755),
        ("proc", 0o555),
        ("sys", 0o555),
        ("run", 0o755),
        ("tmp", 0o1777),
        ("var/tmp", 0o1777),
        ("etc/agentvm", 0o755),
        ("root", 0o700),
        ("workspace", 0o755),
        ("opt/agentvm", 0o755),
    ] {
        tree.dir(d, perm)?;
    }
    // The kernel opens /dev/console for init before /init can mount devtmpfs.
    tree.char_dev("dev/console", 0o600, 5, 1)?;
    tree.char_dev("dev/null", 0o666, 1, 3)?;
    tree.file("init", 0o755, init.clone())?;
    tree.file("bin/busybox", 0o755, bb.data.clone())?;
    for applet in &bb.applets {
        tree.symlink(applet, "/bin/busybox")?;
    }
    tree.file(GUEST_PATH, 0o755, guest_data.clone())?;
    tree.file(DHCP_PATH, 0o755, dhcp)?;
    let mod_dir = format!("lib/modules/{}", kernel.release);
    for m in &sel.modules {
        let data = fs::read(&m.path).with_context(|| format!("read {}", m.path.display()))?;
        tree.file(&format!("{mod_dir}/{}.ko", m.name), 0o644, data)?;
    }
    tree.dir(&mod_dir, 0o755)?;
    let mut order = inputs.modules.join("\n");
    order.push('\n');
    tree.file("etc/agentvm/modules", 0o644, order)?;
    tree.file(
        "etc/agentvm/image",
        0o644,
        format!(
            "name={}\nkey={key}\nkernel={} {}\n",
            args.name, kinfo.package, kinfo.version
        ),
    )?;
    if let Some((rin, _)) = &rootfs_plan {
        tree.file(
            "etc/agentvm/rootfs",
            0o644,
            format!("{} {ROOTFS_SERIAL}\n", rin.format.fs_type()),
        )?;
        tree.file(
            "etc/agentvm/user",
            0o644,
            format!("{} {}\n", rootfs::AGENT_UID, rootfs::AGENT_UID),
        )?;
        tree.dir("mnt", 0o755)?;
    }
    let cpio = tree.to_cpio()?;
    let gz = initramfs::gzip(&cpio)?;
    progress.note(format!(
        "{} entries, {:.1} MiB uncompressed, {:.1} MiB gzip",
        tree.len(),
        mib(cpio.len() as u64),
        mib(gz.len() as u64)
    ));

    // 5. Write: manifest out first, in last.
    progress.step(format!("writing {}", out_dir.display()));
    fs::create_dir_all(&out_dir).with_context(|| format!("create {}", out_dir.display()))?;
    let manifest_path = out_dir.join(MANIFEST);
    match fs::remove_file(&manifest_path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("remove {}", manifest_path.display())),
    }
    let mut vmlinuz =
        fs::read(&kernel.vmlinuz).with_context(|| format!("read {}", kernel.vmlinuz.display()))?;
    boot_header::cap_initrd_addr_max(&mut vmlinuz, boot_header::INITRD_ADDR_MAX)
        .with_context(|| format!("cap the initrd address of {}", kernel.vmlinuz.display()))?;
    write_atomic(&out_dir.join(VMLINUZ), &vmlinuz)?;
    write_atomic(&out_dir.join(INITRAMFS), &gz)?;
    let rootfs_manifest = match &rootfs_built {
        Some((cached, info)) => {
            let file = format!("rootfs.{}", info.inputs.format.extension());
            let target = out_dir.join(&file);
            link_or_copy(cached, &target)?;
            Some(RootfsManifest {
                file,
                size: fs::metadata(&target)?.len(),
                fs_type: info.inputs.format.fs_type().into(),
                suite: info.inputs.suite.clone(),
                mirror: info.inputs.mirror.clone(),
                key: info.key.clone(),
                unpacked_bytes: info.unpacked_bytes,
                mmdebstrap_seconds: info.mmdebstrap_seconds,
                pack_seconds: info.pack_seconds,
                packages: info.packages.clone(),
                agents: info.agents.clone(),
            })
        }
        None => None,
    };
    let default_user = rootfs_manifest.as_ref().map(|_| UserInfo {
        name: rootfs::AGENT_USER.into(),
        uid: rootfs::AGENT_UID,
        gid: rootfs::AGENT_UID,
        home: rootfs::AGENT_HOME.into(),
    });

    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let m = Manifest {
        name: args.name.clone(),
        format_version: manifest::FORMAT_VERSION,
        key: key.clone(),
        cmdline: CMDLINE.to_string(),
        virtio_port: VIRTIO_PORT.to_string(),
        kernel: KernelInfo {
            package: kinfo.package.clone(),
            version: kinfo.version.clone(),
            release: kernel.release.clone(),
            deb_sha256: kernel.deb_sha256.clone(),
        },
        busybox: BusyboxInfo {
            version: bb.version.clone(),
            sha256: bb.sha256.clone(),
            applets: bb.applets.len(),
        },
        guest: GuestInfo {
            path: format!("/{GUEST_PATH}"),
            sha256: guest_sha256,
            size: guest_data.len() as u64,
        },
        modules: sel
            .modules
            .iter()
            .map(|m| ModuleInfo {
                name: m.name.clone(),
                depends: m.depends.clone(),
            })
            .collect(),
        modules_builtin: sel.builtin.clone(),
        modules_unavailable: sel.unavailable.clone(),
        vmlinuz: FileInfo {
            file: VMLINUZ.into(),
            size: vmlinuz.len() as u64,
            sha256: sha256_hex(&vmlinuz),
        },
        initramfs: FileInfo {
            file: INITRAMFS.into(),
            size: gz.len() as u64,
            sha256: sha256_hex(&gz),
        },
        rootfs: rootfs_manifest,
        default_user,
        inputs,
        built_at: rfc3339_utc(now),
        build_seconds: (progress.elapsed_secs() * 100.0).round() / 100.0,
    };
    write_atomic(&manifest_path, m.to_json().as_bytes())?;

    progress.output(format!(
        "image {} built in {:.1}s: {} (vmlinuz {:.1} MiB, initramfs {:.1} MiB)",
        args.name,
        progress.elapsed_secs(),
        out_dir.display(),
        mib(m.vmlinuz.size),
        mib(m.initramfs.size)
    ));
    if let Some(r) = &m.rootfs {
        progress.output(format!(
            "  rootfs: {} ({}, {:.1} MiB, {} Debian packages, agents [{}])",
            r.file,
            r.fs_type,
            mib(r.size),
            r.packages.len(),
            r.agents
                .iter()
                .map(|a| a.source.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    progress.output(format!("  cmdline: {CMDLINE}"));
    Ok(Outcome {
        dir: out_dir,
        key,
        up_to_date: false,
    })
}

/// Hard-links `from` to `to` (same file system: no copy of a large file),
/// else copies it.
fn link_or_copy(from: &Path, to: &Path) -> Result<()> {
    match fs::remove_file(to) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("remove {}", to.display())),
    }
    if fs::hard_link(from, to).is_err() {
        fs::copy(from, to)
            .with_context(|| format!("copy {} to {}", from.display(), to.display()))?;
    }
    Ok(())
}

/// The existing manifest if it has `key` and its files are intact.
fn up_to_date(dir: &Path, key: &str) -> Option<Manifest> {
    let m = Manifest::read(&dir.join(MANIFEST)).ok()?;
    if m.key != key || m.format_version != manifest::FORMAT_VERSION {
        return None;
    }
    for f in [&m.vmlinuz, &m.initramfs] {
        let p = dir.join(&f.file);
        let meta = fs::metadata(&p).ok()?;
        if meta.len() != f.size || sha256_file(&p).ok()? != f.sha256 {
            return None;
        }
    }
    // The root file system disk: its key is part of the image key; check
    // its size (hashing hundreds of MiB on every run would be slow).
    if let Some(r) = &m.rootfs {
        if fs::metadata(dir.join(&r.file)).ok()?.len() != r.size {
            return None;
        }
    }
    Some(m)
}

fn check_name(name: &str) -> Result<(), Error> {
    if name.is_empty()
        || name.starts_with('.')
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(Error::InvalidName { name: name.into() });
    }
    Ok(())
}

fn mib(n: u64) -> f64 {
    n as f64 / (1u64 << 20) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The errors a caller acts on come before any work: nothing is
    /// reported, built or written.
    #[test]
    fn caller_errors_come_first() {
        let events = std::cell::RefCell::new(Vec::new());
        let sink = |e: Event| events.borrow_mut().push(e);
        let tmp = tempfile::tempdir().unwrap();
        let with_out = |mut args: BuildImageArgs| {
            args.out = Some(tmp.path().join("images"));
            args
        };

        let mut args = with_out(BuildImageArgs::defaults());
        args.name_arg = Some("a/b".into());
        let e = run(args, &sink).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidName { name } if name == "a/b"),
            "{e:?}"
        );

        let mut args = with_out(BuildImageArgs::defaults());
        args.with = vec!["codex".into()];
        let e = run(args, &sink).unwrap_err();
        assert!(matches!(&e, Error::RootfsForDefault { .. }), "{e:?}");
        assert!(e.to_string().contains("--name agent --with codex"), "{e}");

        // A source tree without the init script, then without the guest crate.
        let source = tmp.path().join("not-agentvm");
        std::fs::create_dir_all(&source).unwrap();
        let mut args = with_out(BuildImageArgs::defaults());
        args.source = Some(source.clone());
        let e = run(args.clone(), &sink).unwrap_err();
        assert!(
            matches!(&e, Error::SourceNotFound { path, .. } if path == &source.join("images/init")),
            "{e:?}"
        );
        let init = tmp.path().join("init");
        std::fs::write(&init, "#!/bin/sh\n").unwrap();
        args.init = Some(init);
        let e = run(args, &sink).unwrap_err();
        assert!(
            matches!(&e, Error::SourceNotFound { path, instead } if path == &source.join("agentvm-guest") && instead.contains("--guest-bin")),
            "{e:?}"
        );
        assert_eq!(events.into_inner(), []);
        assert!(!tmp.path().join("images").exists());
    }

    #[test]
    fn image_names() {
        for ok in ["default", "rich-1.2", "a_b"] {
            check_name(ok).unwrap();
        }
        for bad in ["", ".", "..", "a/b", "a b", ".hidden"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
