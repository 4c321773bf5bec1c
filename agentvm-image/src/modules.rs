//! Kernel module selection: which modules the image needs, where they are in
//! the unpacked kernel package, and the order to `insmod` them in.
//!
//! Debian's kernel .deb carries no `modules.dep` (depmod runs at install
//! time), so dependencies come from each module's `.modinfo` ELF section
//! (`depends=a,b`), read here without `modinfo`/kmod.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::elf::Elf;

/// Modules the control channel needs (virtio-serial over virtio-mmio for
/// `-M microvm`, over virtio-pci for `-M pc`/`q35`). Missing ones are an
/// error unless the kernel has them built in.
pub const REQUIRED: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_console",
];

/// Modules loaded when the kernel package has them (block, network, vsock).
pub const OPTIONAL: &[&str] = &[
    "virtio_blk",
    "virtio_net",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
];

/// Module names use `_` and `-` interchangeably; the kernel uses `_`.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// The key/value pairs of a `.modinfo` section (NUL-separated `key=value`).
pub fn parse_modinfo(section: &[u8]) -> Vec<(String, String)> {
    section
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .filter_map(|s| {
            let s = String::from_utf8_lossy(s);
            let (k, v) = s.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect()
}

/// The `depends=` list of a module's `.modinfo` (empty when there are none).
pub fn depends_of(modinfo: &[(String, String)]) -> Vec<String> {
    modinfo
        .iter()
        .filter(|(k, _)| k == "depends")
        .flat_map(|(_, v)| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(normalize)
        .collect()
}

#[derive(Debug, PartialEq, Eq)]
pub enum OrderError {
    /// `module` is needed (by `needed_by`, if it is not a root) but unknown.
    Missing {
        module: String,
        needed_by: Option<String>,
    },
    /// The dependency graph has a cycle through these modules.
    Cycle(Vec<String>),
}

impl fmt::Display for OrderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OrderError::Missing {
                module,
                needed_by: Some(by),
            } => write!(f, "module {module} (needed by {by}) not found"),
            OrderError::Missing {
                module,
                needed_by: None,
            } => write!(f, "module {module} not found"),
            OrderError::Cycle(c) => write!(f, "module dependency cycle: {}", c.join(" -> ")),
        }
    }
}

impl std::error::Error for OrderError {}

/// Orders `roots` and everything they depend on (transitively) so that each
/// module comes after all of its dependencies. `deps` maps a module to its
/// direct dependencies. Deterministic: roots are visited in the order given,
/// dependencies in the order listed; each module appears once.
pub fn load_order(
    roots: &[String],
    deps: &BTreeMap<String, Vec<String>>,
) -> Result<Vec<String>, OrderError> {
    fn visit(
        m: &str,
        needed_by: Option<&str>,
        deps: &BTreeMap<String, Vec<String>>,
        done: &mut BTreeSet<String>,
        path: &mut Vec<String>,
        out: &mut Vec<String>,
    ) -> Result<(), OrderError> {
        if done.contains(m) {
            return Ok(());
        }
        if let Some(i) = path.iter().position(|p| p == m) {
            let mut cycle = path[i..].to_vec();
            cycle.push(m.to_string());
            return Err(OrderError::Cycle(cycle));
        }
        let Some(ds) = deps.get(m) else {
            return Err(OrderError::Missing {
                module: m.to_string(),
                needed_by: needed_by.map(str::to_string),
            });
        };
        path.push(m.to_string());
        for d in ds {
            visit(d, Some(m), deps, done, path, out)?;
        }
        path.pop();
        done.insert(m.to_string());
        out.push(m.to_string());
        Ok(())
    }

    let mut done = BTreeSet::new();
    let mut out = Vec::new();
    for r in roots {
        visit(r, None, deps, &mut done, &mut Vec::new(), &mut out)?;
    }
    Ok(out)
}

/// One module to put into the image.
#[derive(Debug, Clone)]
pub struct Module {
    pub name: String,
    /// The `.ko` file in the unpacked kernel package.
    pub path: PathBuf,
    pub depends: Vec<String>,
}

/// The result of [`select`].
#[derive(Debug)]
pub struct Selection {
    /// In load order.
    pub modules: Vec<Module>,
    /// Wanted modules the kernel has built in (nothing to load).
    pub builtin: Vec<String>,
    /// Optional modules this kernel has neither as a module nor built in.
    pub unavailable: Vec<String>,
}

/// Picks [`REQUIRED`], [`OPTIONAL`] and `extra_required` modules (plus their dependencies)
/// from `modules_dir` (`lib/modules/<release>` of the unpacked package).
pub fn select(modules_dir: &Path, extra_required: &[&str]) -> Result<Selection> {
    let index = index_modules(&modules_dir.join("kernel"))?;
    let builtin = read_builtin(modules_dir)?;

    let mut roots = Vec::new();
    let mut builtin_wanted = Vec::new();
    let mut unavailable = Vec::new();
    for (name, required) in REQUIRED
        .iter()
        .map(|n| (n, true))
        .chain(OPTIONAL.iter().map(|n| (n, false)))
        .chain(extra_required.iter().map(|n| (n, true)))
    {
        if roots.contains(&name.to_string()) || builtin_wanted.contains(&name.to_string()) {
            continue;
        }
        let name = name.to_string();
        if index.contains_key(&name) {
            roots.push(name);
        } else if builtin.contains(&name) {
            builtin_wanted.push(name);
        } else if required {
            bail!(
                "kernel module {name} is neither in {} nor built in (modules.builtin): \
                 this kernel cannot run this image",
                modules_dir.display()
            );
        } else {
            unavailable.push(name);
        }
    }

    // Read .modinfo of every module reachable from the roots.
    let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut todo = roots.clone();
    while let Some(m) = todo.pop() {
        if deps.contains_key(&m) {
            continue;
        }
        let Some(path) = index.get(&m) else {
            if builtin.contains(&m) {
                // A dependency on a built-in module: nothing to load.
                deps.insert(m, Vec::new());
                continue;
            }
            continue; // load_order reports it as missing.
        };
        let ds = read_depends(path)?;
        todo.extend(ds.iter().cloned());
        deps.insert(m, ds);
    }

    let order = load_order(&roots, &deps)?;
    let modules = order
        .into_iter()
        .filter_map(|name| {
            let path = index.get(&name)?.clone();
            let depends = deps.get(&name).cloned().unwrap_or_default();
            Some(Module {
                name,
                path,
                depends,
            })
        })
        .collect();
    Ok(Selection {
        modules,
        builtin: builtin_wanted,
        unavailable,
    })
}

/// Reads a module's `depends=` from its `.modinfo` section.
pub fn read_depends(path: &Path) -> Result<Vec<String>> {
    let data = fs::read(path).with_context(|| format!("read {}", path.display()))?;
    let elf = Elf::parse(&data).with_context(|| format!("parse {}", path.display()))?;
    let section = elf
        .section(".modinfo")
        .with_context(|| format!("parse {}", path.display()))?
        .with_context(|| format!("{} has no .modinfo section", path.display()))?;
    Ok(depends_of(&parse_modinfo(section)))
}

/// Maps module name -> `.ko` path for every module under `dir`. Compressed
/// modules (`.ko.xz`/`.ko.zst`/`.ko.gz`) are an error: busybox insmod cannot
/// load them and this xtask does not decompress them.
fn index_modules(dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = fs::read_dir(&d).with_context(|| format!("read {}", d.display()))?;
        for e in entries {
            let e = e?;
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if e.file_type()?.is_dir() {
                stack.push(p);
            } else if let Some(stem) = name.strip_suffix(".ko") {
                out.insert(normalize(stem), p);
            } else if [".ko.xz", ".ko.zst", ".ko.gz"]
                .iter()
                .any(|s| name.ends_with(s))
            {
                bail!(
                    "{} is a compressed module; this xtask only packs uncompressed \
                     modules (use a kernel built with CONFIG_MODULE_COMPRESS_NONE, \
                     such as Debian 12's linux-image-cloud-amd64)",
                    p.display()
                );
            }
        }
    }
    Ok(out)
}

/// Names of built-in modules from `modules.builtin` (absent: none known).
fn read_builtin(modules_dir: &Path) -> Result<BTreeSet<String>> {
    let path = modules_dir.join("modules.builtin");
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    Ok(text
        .lines()
        .filter_map(|l| l.rsplit('/').next())
        .filter_map(|f| f.strip_suffix(".ko"))
        .map(normalize)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deps(edges: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        edges
            .iter()
            .map(|(m, ds)| (m.to_string(), ds.iter().map(|d| d.to_string()).collect()))
            .collect()
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// The dependency graph of Debian 12's 6.1 cloud kernel (6.1.0-56,
    /// `depends=` as read from the .deb).
    fn debian_cloud() -> BTreeMap<String, Vec<String>> {
        deps(&[
            ("virtio_ring", &[]),
            ("virtio", &["virtio_ring"]),
            ("virtio_mmio", &["virtio", "virtio_ring"]),
            ("virtio_pci_legacy_dev", &[]),
            ("virtio_pci_modern_dev", &[]),
            (
                "virtio_pci",
                &[
                    "virtio_ring",
                    "virtio_pci_modern_dev",
                    "virtio_pci_legacy_dev",
                    "virtio",
                ],
            ),
            ("virtio_console", &["virtio", "virtio_ring"]),
            ("virtio_blk", &["virtio", "virtio_ring"]),
            ("failover", &[]),
            ("net_failover", &["failover"]),
            ("virtio_net", &["virtio_ring", "virtio", "net_failover"]),
            ("vsock", &[]),
            ("vmw_vsock_virtio_transport_common", &["vsock"]),
            (
                "vmw_vsock_virtio_transport",
                &[
                    "virtio",
                    "vmw_vsock_virtio_transport_common",
                    "virtio_ring",
                    "vsock",
                ],
            ),
        ])
    }

    fn assert_topological(order: &[String], deps: &BTreeMap<String, Vec<String>>) {
        for (i, m) in order.iter().enumerate() {
            for d in &deps[m] {
                let j = order.iter().position(|x| x == d).expect("dep present");
                assert!(j < i, "{d} must come before {m} in {order:?}");
            }
        }
        let unique: BTreeSet<_> = order.iter().collect();
        assert_eq!(unique.len(), order.len(), "duplicates in {order:?}");
    }

    #[test]
    fn orders_dependencies_first() {
        let g = deps(&[("c", &["b", "a"]), ("b", &["a"]), ("a", &[])]);
        assert_eq!(
            load_order(&names(&["c"]), &g).unwrap(),
            names(&["a", "b", "c"])
        );
    }

    #[test]
    fn orders_the_debian_cloud_modules() {
        let g = debian_cloud();
        let roots: Vec<String> = REQUIRED
            .iter()
            .chain(OPTIONAL)
            .map(|s| s.to_string())
            .collect();
        let order = load_order(&roots, &g).unwrap();
        assert_topological(&order, &g);
        assert_eq!(
            order,
            names(&[
                "virtio_ring",
                "virtio",
                "virtio_mmio",
                "virtio_pci_legacy_dev",
                "virtio_pci_modern_dev",
                "virtio_pci",
                "virtio_console",
                "virtio_blk",
                "failover",
                "net_failover",
                "virtio_net",
                "vsock",
                "vmw_vsock_virtio_transport_common",
                "vmw_vsock_virtio_transport",
            ])
        );
    }

    #[test]
    fn root_order_does_not_matter_for_correctness() {
        let g = debian_cloud();
        let mut roots: Vec<String> = g.keys().cloned().collect();
        roots.reverse();
        let order = load_order(&roots, &g).unwrap();
        assert_topological(&order, &g);
        assert_eq!(order.len(), g.len());
    }

    #[test]
    fn only_pulls_in_what_roots_need() {
        let g = debian_cloud();
        let order = load_order(&names(&["virtio_net"]), &g).unwrap();
        assert_eq!(
            order,
            names(&[
                "virtio_ring",
                "virtio",
                "failover",
                "net_failover",
                "virtio_net"
            ])
        );
    }

    #[test]
    fn reports_missing_modules() {
        let g = deps(&[("a", &["b"])]);
        assert_eq!(
            load_order(&names(&["a"]), &g),
            Err(OrderError::Missing {
                module: "b".into(),
                needed_by: Some("a".into())
            })
        );
        assert_eq!(
            load_order(&names(&["zz"]), &g),
            Err(OrderError::Missing {
                module: "zz".into(),
                needed_by: None
            })
        );
    }

    #[test]
    fn reports_cycles() {
        let g = deps(&[("a", &["b"]), ("b", &["c"]), ("c", &["a"])]);
        assert_eq!(
            load_order(&names(&["a"]), &g),
            Err(OrderError::Cycle(names(&["a", "b", "c", "a"])))
        );
        let g = deps(&[("a", &["a"])]);
        assert!(matches!(
            load_order(&names(&["a"]), &g),
            Err(OrderError::Cycle(_))
        ));
    }

    #[test]
    fn parses_modinfo() {
        let info = parse_modinfo(
            b"license=GPL\0\0\0depends=virtio,virtio-ring\0name=virtio_console\0vermagic=6.1\0",
        );
        assert_eq!(depends_of(&info), names(&["virtio", "virtio_ring"]));
        assert!(info.contains(&("name".into(), "virtio_console".into())));
        assert!(depends_of(&parse_modinfo(b"depends=\0name=virtio\0")).is_empty());
        assert!(depends_of(&parse_modinfo(b"")).is_empty());
    }

    #[test]
    fn selects_from_an_unpacked_kernel_tree() {
        use crate::elf::tests::build_elf;
        let dir = tempfile::tempdir().unwrap();
        let md = dir.path();
        let g = debian_cloud();
        for (m, ds) in &g {
            // virtio_console is built in here; vsock modules are absent.
            if m == "virtio_console" || m.contains("vsock") {
                continue;
            }
            let sub = md.join("kernel/drivers").join(&m[..1]);
            fs::create_dir_all(&sub).unwrap();
            let info = format!("name={m}\0depends={}\0", ds.join(","));
            let elf = build_elf(&[(".modinfo", info.as_bytes())], false);
            // Use '-' in one file name to exercise normalisation.
            let file = if m == "net_failover" {
                "net-failover.ko".into()
            } else {
                format!("{m}.ko")
            };
            fs::write(sub.join(file), elf).unwrap();
        }
        fs::write(
            md.join("modules.builtin"),
            "kernel/drivers/char/virtio_console.ko\nkernel/fs/ext4/ext4.ko\n",
        )
        .unwrap();
        let sel = select(md, &[]).unwrap();
        let order: Vec<&str> = sel.modules.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            order,
            [
                "virtio_ring",
                "virtio",
                "virtio_mmio",
                "virtio_pci_legacy_dev",
                "virtio_pci_modern_dev",
                "virtio_pci",
                "virtio_blk",
                "failover",
                "net_failover",
                "virtio_net",
            ]
        );
        assert_eq!(sel.builtin, names(&["virtio_console"]));
        assert_eq!(
            sel.unavailable,
            names(&[
                "vsock",
                "vmw_vsock_virtio_transport_common",
                "vmw_vsock_virtio_transport"
            ])
        );

        // A required module that is missing altogether is an error.
        fs::write(md.join("modules.builtin"), "").unwrap();
        let err = select(md, &[]).unwrap_err().to_string();
        assert!(err.contains("virtio_console"), "{err}");
    }
}
