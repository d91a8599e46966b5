//! bpf_link attachments to a cgroup, made with the bpf(2) syscall directly.
//!
//! aya 0.14 cannot turn a cgroup-sockopt link into a pinnable `FdLink`, and an
//! init container must pin every link, so all six are created here the same
//! way, and the sk_msg link to the sockhash too. A link detaches when its last
//! reference (fd or pin) goes.

use std::{
    ffi::CString,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

// enum bpf_cmd (uapi/linux/bpf.h; stable ABI)
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// enum bpf_attach_type values of the hooks ambassador uses.
#[derive(Debug, Clone, Copy)]
#[repr(u32)]
pub enum AttachType {
    SockOps = 3,
    SkMsgVerdict = 7,
    Inet4Connect = 10,
    Inet6Connect = 11,
    Udp4SendMsg = 14,
    Udp6SendMsg = 15,
    Udp4RecvMsg = 19,
    Udp6RecvMsg = 20,
    GetSockopt = 21,
    Inet4GetPeerName = 29,
    Inet6GetPeerName = 30,
    SkLookup = 36,
}

/// The prefix of `union bpf_attr` used by BPF_LINK_CREATE; the kernel zero-fills
/// the rest because we pass this size.
#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

/// The prefix of `union bpf_attr` used by BPF_OBJ_PIN / BPF_OBJ_GET.
#[repr(C)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: attr points at a live, initialised, repr(C) prefix of bpf_attr of
    // exactly the size passed; the kernel reads (and may write) only that much.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn fd_from(rc: libc::c_long) -> OwnedFd {
    // SAFETY: a successful BPF_LINK_CREATE / BPF_OBJ_GET returns a new fd that
    // nothing else owns.
    unsafe { OwnedFd::from_raw_fd(rc as i32) }
}

/// Attaches `prog` to the cgroup (or, for sk_lookup, the network namespace)
/// as a bpf_link. Such links always coexist with other programs on the same
/// hook (multi-attach semantics).
pub fn create(prog: BorrowedFd<'_>, cgroup: BorrowedFd<'_>, at: AttachType) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type: at as u32,
        flags: 0,
    };
    bpf(BPF_LINK_CREATE, &mut attr).map(fd_from)
}

/// Attaches `prog` to a sockmap/sockhash as a bpf_link (kernel 6.10+).
pub fn create_for_map(
    prog: BorrowedFd<'_>,
    map: BorrowedFd<'_>,
    at: AttachType,
) -> io::Result<OwnedFd> {
    create(prog, map, at)
}

/// The prefix of `union bpf_attr` used by BPF_LINK_UPDATE.
#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// Makes `link` run `prog` from now on, atomically.
pub fn update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

/// Pins any bpf object (link, map, program) at `path` in bpffs.
pub fn pin(fd: impl AsFd, path: &Path) -> io::Result<()> {
    let p = c_path(path)?;
    let mut attr = ObjAttr {
        pathname: p.as_ptr() as u64,
        bpf_fd: fd.as_fd().as_raw_fd() as u32,
        file_flags: 0,
    };
    bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

/// Opens a pinned object; `Ok(None)` when nothing is pinned there.
pub fn open_pinned(path: &Path) -> io::Result<Option<OwnedFd>> {
    let p = c_path(path)?;
    let mut attr = ObjAttr {
        pathname: p.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    match bpf(BPF_OBJ_GET, &mut attr) {
        Ok(rc) => Ok(Some(fd_from(rc))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The head of `struct bpf_link_info`.
#[repr(C)]
#[derive(Default)]
struct LinkInfoHead {
    link_type: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    _union: [u64; 4],
}

fn link_info(link: impl AsFd) -> io::Result<LinkInfoHead> {
    let mut info = LinkInfoHead::default();
    let mut attr = InfoAttr {
        bpf_fd: link.as_fd().as_raw_fd() as u32,
        info_len: std::mem::size_of::<LinkInfoHead>() as u32,
        info: &mut info as *mut LinkInfoHead as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info)
}

/// The id of the program a link runs.
pub fn prog_id(link: impl AsFd) -> io::Result<u32> {
    link_info(link).map(|i| i.prog_id)
}

/// enum bpf_link_type: BPF_LINK_TYPE_CGROUP.
const LINK_TYPE_CGROUP: u32 = 3;

/// The cgroup a cgroup link is attached to; `None` once the cgroup is gone
/// (removed by its owner: the kernel detaches the link and reports id 0, while
/// the pin keeps the link, its program and its maps alive). Not a cgroup link
/// is an error.
pub fn cgroup_id(link: impl AsFd) -> io::Result<Option<u64>> {
    let info = link_info(link)?;
    if info.link_type != LINK_TYPE_CGROUP {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bpf link of type {} is not a cgroup link", info.link_type),
        ));
    }
    // struct bpf_link_info's union starts with `struct { __u64 cgroup_id; ... } cgroup`.
    Ok(match info._union[0] {
        0 => None,
        id => Some(id),
    })
}
