//! `cargo xtask setup-network`: the libvirt NAT network `agentvm-nat` and the
//! nwfilter `agentvm-egress` used by `network = "nat-filtered"`.
//!
//! The xtask must build without libvirt headers, so it drives `virsh` as a
//! subprocess. The XML is built by pure functions (unit-tested).
//!
//! The filter lets a guest open connections to DNS (udp/tcp 53), HTTP (80),
//! HTTPS (443), SSH (22) and git (9418), plus DHCP to get its address from the
//! network's dnsmasq; traffic belonging to such connections (ESTABLISHED,
//! RELATED) flows both ways; everything else, IPv4 and IPv6, is dropped —
//! in particular any connection opened *towards* the guest.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The network's name (`crate::backend::libvirt::domain_xml::NAT_NETWORK` in the runtime).
pub const NETWORK: &str = "agentvm-nat";
/// The filter's name (`EGRESS_FILTER` in the runtime).
pub const FILTER: &str = "agentvm-egress";
/// The host bridge (at most 15 characters).
pub const BRIDGE: &str = "virbr-agentvm";
/// The network's /24 (host side `.1`, DHCP `.10`-`.254`).
pub const SUBNET_PREFIX: &str = "192.168.213";

/// TCP ports a guest may connect to.
pub const TCP_PORTS: &[(u16, &str)] = &[
    (53, "DNS"),
    (80, "HTTP"),
    (443, "HTTPS"),
    (22, "SSH"),
    (9418, "git"),
];
/// UDP ports a guest may send to.
pub const UDP_PORTS: &[(u16, &str)] = &[(53, "DNS"), (67, "DHCP")];

/// Arguments of `cargo xtask setup-network`.
#[derive(Debug, Clone, clap::Args)]
pub struct SetupNetworkArgs {
    /// Print the network and filter XML, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Remove the network and the filter instead.
    #[arg(long)]
    pub teardown: bool,
    /// libvirt URI (default: LIBVIRT_DEFAULT_URI, else qemu:///system).
    #[arg(long)]
    pub uri: Option<String>,
}

/// The network XML.
pub fn network_xml() -> String {
    format!(
        "<network>
  <name>{NETWORK}</name>
  <forward mode='nat'/>
  <bridge name='{BRIDGE}' stp='on' delay='0'/>
  <ip address='{SUBNET_PREFIX}.1' netmask='255.255.255.0'>
    <dhcp>
      <range start='{SUBNET_PREFIX}.10' end='{SUBNET_PREFIX}.254'/>
    </dhcp>
  </ip>
</network>
"
    )
}

/// The nwfilter XML.
pub fn filter_xml() -> String {
    let mut rules = String::new();
    rules.push_str(
        "  <!-- replies and related traffic of connections the guest opened -->\n  \
<rule action='accept' direction='inout' priority='100'>\n    \
<all state='ESTABLISHED,RELATED'/>\n  </rule>\n",
    );
    for (port, what) in UDP_PORTS {
        rules.push_str(&format!(
            "  <!-- {what} -->\n  <rule action='accept' direction='out' priority='200'>\n    <udp dstportstart='{port}' state='NEW'/>\n  </rule>\n"
        ));
    }
    for (port, what) in TCP_PORTS {
        rules.push_str(&format!(
            "  <!-- {what} -->\n  <rule action='accept' direction='out' priority='200'>\n    <tcp dstportstart='{port}' state='NEW'/>\n  </rule>\n"
        ));
    }
    rules.push_str(
        "  <!-- everything else, both directions -->\n  \
<rule action='drop' direction='inout' priority='1000'>\n    <all/>\n  </rule>\n  \
<rule action='drop' direction='inout' priority='1000'>\n    <all-ipv6/>\n  </rule>\n",
    );
    format!("<filter name='{FILTER}' chain='root'>\n{rules}</filter>\n")
}

/// The URI: `--uri`, else `LIBVIRT_DEFAULT_URI`, else `qemu:///system`.
pub fn resolve_uri(arg: Option<&str>, env: Option<&str>) -> String {
    arg.or(env)
        .filter(|s| !s.trim().is_empty())
        .unwrap_or("qemu:///system")
        .trim()
        .to_owned()
}

struct Virsh {
    uri: String,
}

impl Virsh {
    fn run(&self, args: &[&str]) -> Result<(bool, String)> {
        let out = Command::new("virsh")
            .arg("-c")
            .arg(&self.uri)
            .args(args)
            .output()
            .context("running virsh (install it: apt-get install libvirt-clients)")?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok((out.status.success(), text))
    }

    fn must(&self, args: &[&str]) -> Result<String> {
        let (ok, text) = self.run(args)?;
        if !ok {
            bail!("virsh {} failed: {}", args.join(" "), text.trim());
        }
        Ok(text)
    }
}

/// The state of the network as `virsh net-info` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetState {
    /// Defined at all.
    pub exists: bool,
    /// Running.
    pub active: bool,
    /// Started with the daemon.
    pub autostart: bool,
}

/// Parses `virsh net-info` output (`Active: yes`, `Autostart: yes`).
pub fn parse_net_info(text: &str) -> NetState {
    let field = |name: &str| {
        text.lines().any(|l| {
            l.split_once(':')
                .is_some_and(|(k, v)| k.trim() == name && v.trim() == "yes")
        })
    };
    NetState {
        exists: true,
        active: field("Active"),
        autostart: field("Autostart"),
    }
}

fn write_temp(name: &str, xml: &str) -> Result<PathBuf> {
    let path = std::env::temp_dir().join(format!("{name}-{}.xml", std::process::id()));
    std::fs::write(&path, xml).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// `cargo xtask setup-network`.
pub fn run(args: &SetupNetworkArgs) -> Result<()> {
    if args.dry_run {
        print!("<!-- network {NETWORK} -->\n{}", network_xml());
        print!("<!-- nwfilter {FILTER} -->\n{}", filter_xml());
        return Ok(());
    }
    let env = std::env::var("LIBVIRT_DEFAULT_URI").ok();
    let virsh = Virsh {
        uri: resolve_uri(args.uri.as_deref(), env.as_deref()),
    };
    let (ok, text) = virsh.run(&["version"])?;
    if !ok {
        bail!(
            "libvirt daemon unreachable at {}: start it with scripts/start-libvirtd.sh ({})",
            virsh.uri,
            text.trim()
        );
    }
    let (net_exists, net_info) = virsh.run(&["net-info", NETWORK])?;
    let net = if net_exists {
        parse_net_info(&net_info)
    } else {
        NetState {
            exists: false,
            active: false,
            autostart: false,
        }
    };
    let (filter_exists, _) = virsh.run(&["nwfilter-dumpxml", FILTER])?;

    if args.teardown {
        let mut changed = false;
        if net.exists {
            if net.active {
                virsh.must(&["net-destroy", NETWORK])?;
            }
            virsh.must(&["net-undefine", NETWORK])?;
            println!("removed network {NETWORK}");
            changed = true;
        }
        if filter_exists {
            virsh.must(&["nwfilter-undefine", FILTER])?;
            println!("removed nwfilter {FILTER}");
            changed = true;
        }
        if !changed {
            println!("{NETWORK} and {FILTER} are not set up, nothing changed");
        }
        return Ok(());
    }

    if net.exists && net.active && net.autostart && filter_exists {
        println!(
            "{NETWORK} and {FILTER} already set up at {}, nothing changed",
            virsh.uri
        );
        return Ok(());
    }
    if !filter_exists {
        let file = write_temp(FILTER, &filter_xml())?;
        let r = virsh.must(&["nwfilter-define", file.to_str().context("temp path")?]);
        let _ = std::fs::remove_file(&file);
        r?;
        println!("defined nwfilter {FILTER}");
    }
    if !net.exists {
        let file = write_temp(NETWORK, &network_xml())?;
        let r = virsh.must(&["net-define", file.to_str().context("temp path")?]);
        let _ = std::fs::remove_file(&file);
        r?;
        println!("defined network {NETWORK}");
    }
    if !net.active {
        virsh.must(&["net-start", NETWORK]).context(
            "starting the network needs iptables and dnsmasq-base installed before libvirtd started (scripts/start-libvirtd.sh does both)",
        )?;
        println!("started network {NETWORK}");
    }
    if !net.autostart {
        virsh.must(&["net-autostart", NETWORK])?;
        println!("network {NETWORK} starts with the daemon");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_is_nat_on_its_own_bridge() {
        let x = network_xml();
        for s in [
            "<name>agentvm-nat</name>",
            "<forward mode='nat'/>",
            "<bridge name='virbr-agentvm' stp='on' delay='0'/>",
            "<ip address='192.168.213.1' netmask='255.255.255.0'>",
            "<range start='192.168.213.10' end='192.168.213.254'/>",
        ] {
            assert!(x.contains(s), "missing {s} in\n{x}");
        }
        assert!(BRIDGE.len() <= 15);
    }

    #[test]
    fn filter_allows_exactly_the_listed_egress() {
        let x = filter_xml();
        assert!(
            x.starts_with("<filter name='agentvm-egress' chain='root'>\n"),
            "{x}"
        );
        assert!(x.contains(
            "<rule action='accept' direction='inout' priority='100'>\n    <all state='ESTABLISHED,RELATED'/>\n  </rule>"
        ));
        for port in [53, 80, 443, 22, 9418] {
            assert!(
                x.contains(&format!(
                    "<rule action='accept' direction='out' priority='200'>\n    <tcp dstportstart='{port}' state='NEW'/>\n  </rule>"
                )),
                "tcp {port}:\n{x}"
            );
        }
        for port in [53, 67] {
            assert!(
                x.contains(&format!("<udp dstportstart='{port}' state='NEW'/>")),
                "udp {port}"
            );
        }
        // Nothing is accepted inbound except established/related traffic.
        assert_eq!(x.matches("action='accept'").count(), 1 + 2 + 5);
        assert_eq!(x.matches("direction='in'").count(), 0);
        assert!(x.contains(
            "<rule action='drop' direction='inout' priority='1000'>\n    <all/>\n  </rule>"
        ));
        assert!(x.contains("<all-ipv6/>"));
        assert!(x.trim_end().ends_with("</filter>"));
    }

    #[test]
    fn net_info_parsing() {
        let text = "Name:           agentvm-nat\nUUID:           x\nActive:         yes\nPersistent:     yes\nAutostart:      no\nBridge:         virbr-agentvm\n";
        assert_eq!(
            parse_net_info(text),
            NetState {
                exists: true,
                active: true,
                autostart: false
            }
        );
    }

    #[test]
    fn uri() {
        assert_eq!(resolve_uri(None, None), "qemu:///system");
        assert_eq!(
            resolve_uri(Some("test:///default"), Some("x")),
            "test:///default"
        );
        assert_eq!(
            resolve_uri(None, Some("qemu:///session")),
            "qemu:///session"
        );
    }

    /// With a real daemon (`AGENTVM_TEST_LIBVIRT=1`): set up twice (the second
    /// time changes nothing) and check both objects exist. Sends no traffic.
    #[test]
    fn setup_against_a_real_daemon() {
        if std::env::var("AGENTVM_TEST_LIBVIRT").as_deref() != Ok("1") {
            eprintln!("skipped: set AGENTVM_TEST_LIBVIRT=1 with a running libvirtd");
            return;
        }
        let args = SetupNetworkArgs {
            dry_run: false,
            teardown: false,
            uri: None,
        };
        run(&args).unwrap();
        run(&args).unwrap();
        let virsh = Virsh {
            uri: resolve_uri(None, std::env::var("LIBVIRT_DEFAULT_URI").ok().as_deref()),
        };
        let info = parse_net_info(&virsh.must(&["net-info", NETWORK]).unwrap());
        assert!(info.active && info.autostart, "{info:?}");
        let filter = virsh.must(&["nwfilter-dumpxml", FILTER]).unwrap();
        assert!(filter.contains("9418"), "{filter}");
    }
}
