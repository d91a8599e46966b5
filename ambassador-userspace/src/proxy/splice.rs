//! Bulk bytes of a plain relay moved by the kernel: `splice(2)` from the
//! source socket into a pipe and from the pipe into the destination socket,
//! so the pages are handed on, not copied through user space twice. The
//! relay starts every direction with ordinary reads (an idle connection
//! holds no pipe) and turns a direction over to splicing once a read fills
//! its whole buffer and the source's receive queue is known to hold all
//! that is left of its bytes ([`Gate`]). Ordering, backpressure (nothing is
//! read while the pipe still holds bytes), half-close and resets behave as
//! in the copying relay.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

use ambassador_common::{
    SHORTCUT_KEEP_TCP, SHORTCUT_NONE, SO_AMB_SHORTCUT, SOL_IP, ShortcutAnswer,
};
use tokio::{io::Interest, net::TcpStream};

/// The pipe's capacity asked for: in flight per spliced direction at most.
const PIPE_SIZE: libc::c_int = 256 * 1024;
/// One splice call moves at most this much; the pipe's capacity bounds it too.
const MOVE_AT_MOST: usize = 1 << 20;

/// When a relay direction may take bytes from its source socket by splice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// Never: `proxy.splice: false`, or a source that is not a plain socket.
    Off,
    /// An ordinary TCP socket: every byte is in its receive queue.
    Plain,
    /// The proxy's end of a connection the kernel redirected: the app's bytes
    /// may come by the sk_msg shortcut, into a queue splice cannot read.
    Shortcut,
}

impl Gate {
    /// Whether splice may read `src` from now on, `read` bytes having been
    /// read from it so far. The shortcut moves one way (to TCP, for good), and
    /// a reader gets shortcut bytes before TCP ones: once the app's socket
    /// keeps to TCP and the proxy has read every byte it sent the other way,
    /// the receive queue holds the rest. Unknown (no kernel answer) is no.
    pub fn open(self, src: &TcpStream, read: u64) -> bool {
        match self {
            Gate::Off => false,
            Gate::Plain => true,
            Gate::Shortcut => match shortcut(src) {
                Ok(Some(a)) => may_splice(&a, read),
                Ok(None) | Err(_) => false,
            },
        }
    }
}

/// The gate for the app's end of a connection the kernel redirected.
pub fn outbound_gate(settings: &crate::net::Settings) -> Gate {
    if settings.splice {
        Gate::Shortcut
    } else {
        Gate::Off
    }
}

/// The decision on the kernel's answer, apart for tests.
fn may_splice(a: &ShortcutAnswer, read: u64) -> bool {
    match a.state {
        SHORTCUT_NONE => true,
        SHORTCUT_KEEP_TCP => read >= a.redirected,
        _ => false,
    }
}

/// Asks the kernel program about the app's end of `sock`'s connection; none
/// when no program answers the option.
fn shortcut(sock: &TcpStream) -> io::Result<Option<ShortcutAnswer>> {
    let mut answer = ShortcutAnswer::default();
    let mut len = std::mem::size_of::<ShortcutAnswer>() as libc::socklen_t;
    // SAFETY: `answer` is a plain repr(C) struct of `len` bytes that outlives
    // the call; the kernel writes at most `len` bytes and updates `len`.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            SOL_IP,
            SO_AMB_SHORTCUT,
            (&mut answer as *mut ShortcutAnswer).cast(),
            &mut len,
        )
    };
    if r == 0 {
        return Ok((len as usize == std::mem::size_of::<ShortcutAnswer>()).then_some(answer));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENOPROTOOPT) => Ok(None),
        _ => Err(e),
    }
}

/// A pipe for one direction's bytes in flight.
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    pub fn new() -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two descriptors into the array it is given.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors are fresh and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // Fewer, larger moves. Refused (a user's pipe pages run short): the
        // default 64 KiB still works.
        // SAFETY: fcntl on a descriptor we own; no memory is passed.
        unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
        Ok(Pipe { read, write })
    }

    /// Moves what `src` has received into the pipe (0: the peer's FIN).
    pub fn fill(&self, src: &TcpStream) -> io::Result<usize> {
        src.try_io(Interest::READABLE, || {
            splice(src.as_raw_fd(), self.write.as_raw_fd(), MOVE_AT_MOST)
        })
    }

    /// Moves up to `n` bytes from the pipe into `dst`.
    pub fn drain(&self, dst: &TcpStream, n: usize) -> io::Result<usize> {
        dst.try_io(Interest::WRITABLE, || {
            splice(self.read.as_raw_fd(), dst.as_raw_fd(), n)
        })
    }
}

fn splice(from: RawFd, to: RawFd, n: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the call (owned by the caller's
    // sockets and pipe); null offsets mean the descriptors' own positions.
    let r = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            n,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ambassador_common::SHORTCUT_TAKE;

    fn answer(state: u32, redirected: u64) -> ShortcutAnswer {
        ShortcutAnswer {
            state,
            _pad: 0,
            redirected,
        }
    }

    #[test]
    fn splice_waits_until_the_shortcut_bytes_are_read() {
        let cases = [
            // Not on the shortcut: all bytes came by TCP.
            (answer(SHORTCUT_NONE, 0), 0, true),
            // Still on it: its next bytes skip the receive queue.
            (answer(SHORTCUT_TAKE, 1000), 5000, false),
            // Off it, but 1000 shortcut bytes not all read yet.
            (answer(SHORTCUT_KEEP_TCP, 1000), 999, false),
            (answer(SHORTCUT_KEEP_TCP, 1000), 1000, true),
            (answer(SHORTCUT_KEEP_TCP, 0), 0, true),
            // A state this build does not know: no.
            (answer(7, 0), 10, false),
        ];
        for (a, read, want) in cases {
            assert_eq!(may_splice(&a, read), want, "{a:?} after {read} bytes");
        }
    }
}
