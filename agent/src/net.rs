//! The guest's own network identity, set once at boot by PID 1: the hostname (`agent.hostname=`,
//! default `hull`) and the loopback interface, which the kernel creates down. Bringing `lo` up is
//! the classic `SIOCGIFFLAGS` / `SIOCSIFFLAGS` ioctl pair on any socket (`ip link set lo up`
//! without netlink); the kernel adds 127.0.0.1/8 and ::1 by itself once it is up.

use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

/// Setting up the network identity failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// sethostname(2) failed.
    #[error("sethostname({name:?}): {errno}")]
    Hostname {
        /// The name.
        name: String,
        /// Why.
        errno: Errno,
    },
    /// An interface name longer than the kernel's 15 bytes.
    #[error("interface name {0:?} is longer than 15 bytes")]
    IfName(String),
    /// A socket or ioctl call on an interface failed.
    #[error("{what} {ifname}: {errno}")]
    Interface {
        /// The call.
        what: &'static str,
        /// The interface.
        ifname: String,
        /// Why.
        errno: Errno,
    },
}

/// sethostname(2).
pub fn set_hostname(name: &str) -> Result<(), NetError> {
    nix::unistd::sethostname(name).map_err(|errno| NetError::Hostname {
        name: name.to_owned(),
        errno,
    })
}

/// Brings the loopback interface up.
pub fn loopback_up() -> Result<(), NetError> {
    interface_up("lo")
}

/// Sets `IFF_UP` on `ifname` (no-op when it is up already).
pub fn interface_up(ifname: &str) -> Result<(), NetError> {
    let err = |what: &'static str| {
        move |errno: Errno| NetError::Interface {
            what,
            ifname: ifname.to_owned(),
            errno,
        }
    };
    let mut req = ifreq(ifname)?;
    let sock: OwnedFd = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(err("socket(AF_INET) for"))?;

    // SAFETY: SIOCGIFFLAGS reads an interface name from and writes the flags into the `ifreq` that
    // `req` is, a live, properly sized struct; `sock` is an open socket.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) };
    Errno::result(rc).map_err(err("SIOCGIFFLAGS"))?;
    // SAFETY: after a successful SIOCGIFFLAGS the union holds `ifru_flags` (and it was zeroed before:
    // every variant's bytes are initialised).
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    let up = libc::c_short::try_from(libc::IFF_UP).unwrap_or(1);
    if flags & up != 0 {
        return Ok(());
    }
    req.ifr_ifru.ifru_flags = flags | up;
    // SAFETY: as above; SIOCSIFFLAGS only reads the name and the flags from `req`.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) };
    Errno::result(rc).map_err(err("SIOCSIFFLAGS"))?;
    Ok(())
}

/// A zeroed `ifreq` naming `ifname`.
fn ifreq(ifname: &str) -> Result<libc::ifreq, NetError> {
    let name = ifname.as_bytes();
    if name.len() >= libc::IFNAMSIZ || name.contains(&0) {
        return Err(NetError::IfName(ifname.to_owned()));
    }
    // SAFETY: `ifreq` is plain data (byte arrays, integers, a raw pointer, sockaddrs): all zeroes is
    // a valid value of each of its fields.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &src) in req.ifr_name.iter_mut().zip(name) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names() {
        let req = ifreq("lo").unwrap();
        assert_eq!(
            req.ifr_name[..3],
            [b'l' as libc::c_char, b'o' as libc::c_char, 0]
        );
        assert!(ifreq("a23456789012345").is_ok());
        let e = ifreq("a234567890123456").unwrap_err();
        assert_eq!(
            e.to_string(),
            "interface name \"a234567890123456\" is longer than 15 bytes"
        );
        assert!(ifreq("a\0b").is_err());
    }

    #[test]
    fn loopback_on_this_machine() {
        // Where `lo` is up already (hosts, most containers) the call only reads the flags: no
        // privilege needed. Elsewhere (a fresh network namespace) setting them needs root.
        let flags = std::fs::read_to_string("/sys/class/net/lo/flags").unwrap_or_default();
        let up = i64::from_str_radix(flags.trim().trim_start_matches("0x"), 16)
            .is_ok_and(|f| f & i64::from(libc::IFF_UP) != 0);
        if up {
            loopback_up().unwrap();
        }
        // A missing interface is reported by name.
        let e = interface_up("hull-nonexist").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("SIOCGIFFLAGS hull-nonexist: ENODEV"),
            "{e}"
        );
    }
}
