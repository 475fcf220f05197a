//! The io_uring data path of the memory node (`--io uring`).
//!
//! Same shape as the blocking path in `server.rs`, a thread per connection,
//! but the thread drives its socket through its own small ring: frames are
//! received with `IORING_OP_RECV` into one buffer and handled in place (no
//! copy of WRITE data out of the receive buffer), all requests already
//! received are answered with one `IORING_OP_SEND`, and that send is
//! submitted together with the next receive, so a request/reply round trip
//! costs one `io_uring_enter(2)` instead of a `write(2)` and a `read(2)`.
//! Request handling itself is `server::Conn::handle`, shared with the
//! blocking path.
//!
//! Soundness: the kernel writes into `Loop::inbuf` while a receive is in
//! flight and reads `Loop::sending` while a send is. Neither buffer is
//! touched, moved or freed until its operation has completed: the loop only
//! looks at `inbuf` with no receive in flight, and `Drop` cancels and drains
//! whatever is still in flight (or leaks the buffers if it cannot).

use std::io::{self, ErrorKind};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};
use tracing::warn;

use crate::protocol::HEADER_LEN;
use crate::server::{Conn, Next, FLUSH_AT, READ_BUFFER};

/// `user_data` tags of the operations.
const RECV: u64 = 1;
const SEND: u64 = 2;
const CANCEL: u64 = 3;
/// Ring size: at most a receive, a send and their two cancels are queued.
const ENTRIES: u32 = 8;
/// Largest single send, so a peer that reads slowly still shows progress
/// within the I/O timeout.
const SEND_CHUNK: usize = 1 << 20;

/// Serves one connection until it ends, through an io_uring of its own.
pub(crate) fn run(conn: &mut Conn<'_>) -> io::Result<()> {
    let stream = conn.stream;
    stream.set_nodelay(true)?;
    let mut lp = Loop {
        ring: new_ring()?,
        stream,
        inbuf: vec![0; READ_BUFFER],
        start: 0,
        end: 0,
        sending: Vec::with_capacity(64 << 10),
        sent: 0,
        chunk: 0,
        recv_inflight: false,
        send_inflight: false,
    };
    lp.serve(conn)
    // Dropping `lp` waits for anything still in flight (error paths).
}

/// Checks that this kernel lets us use io_uring, so `--io uring` fails at
/// startup rather than on every connection.
pub(crate) fn probe() -> io::Result<()> {
    new_ring()
        .map(drop)
        .map_err(|e| io::Error::new(e.kind(), format!("io_uring is unavailable: {e}")))
}

/// A ring that runs completion work only when this thread waits on it: no
/// interrupts of other work, and the fewest context switches.
fn new_ring() -> io::Result<IoUring> {
    IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(ENTRIES)
        .or_else(|_| IoUring::new(ENTRIES)) // kernels before 6.1
}

/// What handling the received frames left to do.
enum Step {
    /// Every complete frame is handled: receive more.
    NeedData,
    /// Replies piled up: send them before handling more.
    Flush,
    /// The handler ended the connection: send what is queued, then stop.
    Close,
}

struct Loop<'a> {
    ring: IoUring,
    stream: &'a TcpStream,
    /// Received bytes; `start..end` is not yet handled. Whole, zero-filled
    /// length, so every view of it is a plain slice.
    inbuf: Vec<u8>,
    start: usize,
    end: usize,
    /// The reply batch being sent; `sent` bytes of it are gone.
    sending: Vec<u8>,
    sent: usize,
    /// Length of the send in flight.
    chunk: usize,
    recv_inflight: bool,
    send_inflight: bool,
}

impl Loop<'_> {
    fn serve(&mut self, conn: &mut Conn<'_>) -> io::Result<()> {
        let timeout = conn.state.cfg.io_timeout;
        let accepted = Instant::now();
        let mut last_recv = accepted;
        let mut last_send = accepted;
        let (mut closing, mut eof) = (false, false);
        loop {
            let mut want_recv = false;
            let mut truncated = false;
            if !self.recv_inflight && !closing {
                match self.handle_frames(conn) {
                    Step::NeedData => {
                        want_recv = !eof;
                        // At EOF, bytes left after the complete frames are a
                        // frame that will never finish.
                        truncated = eof && self.start != self.end;
                    }
                    Step::Flush => {}
                    Step::Close => closing = true,
                }
            }
            if truncated {
                // The peer hung up mid-frame: answer what was complete, then
                // report the truncation like the blocking path does.
                self.flush_all(conn)?;
                return Err(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "peer closed mid-frame",
                ));
            }
            if !self.send_inflight && self.sent == self.sending.len() && !conn.out.is_empty() {
                std::mem::swap(&mut self.sending, &mut conn.out);
                conn.out.clear();
                self.sent = 0;
            }
            if !self.send_inflight && self.sent < self.sending.len() {
                self.push_send()?;
                last_send = Instant::now();
            }
            if want_recv && !self.recv_inflight {
                self.push_recv()?;
            }
            if !self.recv_inflight && !self.send_inflight {
                // Nothing in flight and nothing to send: closed or at EOF.
                return Ok(());
            }
            let now = Instant::now();
            let mut deadline = None;
            if !conn.ready() {
                deadline = Some(accepted + timeout);
            } else if self.recv_inflight && self.start != self.end {
                deadline = Some(last_recv + timeout);
            }
            if self.send_inflight {
                let d = last_send + timeout;
                deadline = Some(deadline.map_or(d, |x: Instant| x.min(d)));
            }
            // Never wait for everything while a send is in flight: a send
            // may complete short (seen over a veth with MTU 1500), and the
            // peer sends nothing more until it has the rest of its reply, so
            // waiting for the receive too would stall until the timeout.
            // With no send in flight, waiting for all is waiting for the
            // receive alone.
            let all = !self.send_inflight;
            self.wait(all, deadline.map(|d| d.saturating_duration_since(now)))?;
            for (tag, res) in self.completions() {
                match tag {
                    RECV => {
                        self.recv_inflight = false;
                        match res {
                            0 => eof = true,
                            n if n > 0 => {
                                self.end += n as usize;
                                last_recv = Instant::now();
                            }
                            e => return Err(io::Error::from_raw_os_error(-e)),
                        }
                    }
                    SEND => {
                        self.send_inflight = false;
                        if res < 0 {
                            return Err(io::Error::from_raw_os_error(-res));
                        }
                        self.sent += res as usize;
                        last_send = Instant::now();
                    }
                    _ => {}
                }
            }
            let now = Instant::now();
            if !conn.ready() && now >= accepted + timeout {
                return Err(io::Error::new(
                    ErrorKind::TimedOut,
                    "handshake not completed in time",
                ));
            }
            if self.recv_inflight && self.start != self.end && now >= last_recv + timeout {
                return Err(io::Error::new(
                    ErrorKind::TimedOut,
                    "peer stalled mid-frame",
                ));
            }
            if self.send_inflight && now >= last_send + timeout {
                return Err(io::Error::new(
                    ErrorKind::TimedOut,
                    "peer stopped reading replies",
                ));
            }
        }
    }

    /// Handles every complete frame in `inbuf`, unless replies pile up.
    /// Called only with no receive in flight.
    fn handle_frames(&mut self, conn: &mut Conn<'_>) -> Step {
        loop {
            let avail = self.end - self.start;
            if avail < HEADER_LEN {
                return Step::NeedData;
            }
            if conn.out.len() >= FLUSH_AT {
                return Step::Flush;
            }
            let raw: [u8; HEADER_LEN] = self.inbuf[self.start..self.start + HEADER_LEN]
                .try_into()
                .expect("header length");
            let Some(header) = conn.header(&raw) else {
                return Step::Close;
            };
            let total = HEADER_LEN + header.len as usize;
            if avail < total {
                return Step::NeedData;
            }
            let payload = &self.inbuf[self.start + HEADER_LEN..self.start + total];
            let next = conn.handle(header, payload);
            self.start += total;
            if matches!(next, Next::Close) {
                return Step::Close;
            }
        }
    }

    /// Sends everything queued and waits for it (used before giving up).
    fn flush_all(&mut self, conn: &mut Conn<'_>) -> io::Result<()> {
        loop {
            if !self.send_inflight && self.sent == self.sending.len() {
                if conn.out.is_empty() {
                    return Ok(());
                }
                std::mem::swap(&mut self.sending, &mut conn.out);
                conn.out.clear();
                self.sent = 0;
            }
            if !self.send_inflight {
                self.push_send()?;
            }
            self.wait(true, Some(conn.state.cfg.io_timeout))?;
            for (tag, res) in self.completions() {
                if tag == SEND {
                    self.send_inflight = false;
                    if res < 0 {
                        return Err(io::Error::from_raw_os_error(-res));
                    }
                    self.sent += res as usize;
                } else if tag == RECV {
                    self.recv_inflight = false;
                }
            }
            if self.send_inflight {
                return Err(io::Error::new(
                    ErrorKind::TimedOut,
                    "peer stopped reading replies",
                ));
            }
        }
    }

    /// Makes room after the unhandled bytes (moving them to the front, and
    /// growing for a frame larger than the buffer), then receives into it.
    fn push_recv(&mut self) -> io::Result<()> {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
            if self.inbuf.len() > READ_BUFFER {
                // A huge frame is done: give its memory back.
                self.inbuf.truncate(READ_BUFFER);
                self.inbuf.shrink_to_fit();
            }
        } else if self.start > 0 {
            self.inbuf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        // The header of a partial frame was validated (len <= MAX_PAYLOAD).
        let need = if self.end >= HEADER_LEN {
            let len = u32::from_le_bytes(self.inbuf[4..8].try_into().expect("4 bytes"));
            HEADER_LEN + len as usize
        } else {
            HEADER_LEN
        };
        if self.inbuf.len() < need {
            self.inbuf.resize(need, 0);
        }
        let room = &mut self.inbuf[self.end..];
        let sqe = opcode::Recv::new(
            types::Fd(self.stream.as_raw_fd()),
            room.as_mut_ptr(),
            room.len().min(u32::MAX as usize) as u32,
        )
        .build()
        .user_data(RECV);
        // SAFETY: the receive writes at most `room.len()` bytes into `inbuf`
        // past `end`. `inbuf` is neither read, resized nor freed until the
        // RECV completion is reaped (`recv_inflight` guards every access and
        // `Drop` drains or leaks), so the memory stays valid and unaliased.
        unsafe { self.push(&sqe)? };
        self.recv_inflight = true;
        Ok(())
    }

    fn push_send(&mut self) -> io::Result<()> {
        let rest = &self.sending[self.sent..];
        let len = rest.len().min(SEND_CHUNK);
        self.chunk = len;
        let sqe = opcode::Send::new(
            types::Fd(self.stream.as_raw_fd()),
            rest.as_ptr(),
            len as u32,
        )
        // Complete only when all `len` bytes are queued (or on error):
        // one completion per batch, and the enter that submits it can
        // wait for the next request as well.
        .flags(libc::MSG_WAITALL | libc::MSG_NOSIGNAL)
        .build()
        .user_data(SEND);
        // SAFETY: the send reads `len` bytes of `sending`, which is not
        // modified, swapped or freed until the SEND completion is reaped
        // (`send_inflight` guards it and `Drop` drains or leaks).
        unsafe { self.push(&sqe)? };
        self.send_inflight = true;
        Ok(())
    }

    /// Queues one entry.
    ///
    /// # Safety
    /// Memory the entry points to must stay valid until its completion.
    unsafe fn push(&mut self, sqe: &squeue::Entry) -> io::Result<()> {
        // SAFETY: the caller guarantees the entry's buffers outlive it.
        unsafe { self.ring.submission().push(sqe) }
            .map_err(|_| io::Error::other("io_uring submission queue full"))
    }

    /// Submits what is queued and waits until every operation in flight
    /// (`all`) or any one of them has completed, or `limit` passes. One
    /// system call.
    fn wait(&mut self, all: bool, limit: Option<Duration>) -> io::Result<()> {
        let inflight = usize::from(self.recv_inflight) + usize::from(self.send_inflight);
        let want = if all { inflight } else { inflight.min(1) };
        let submitter = self.ring.submitter();
        let r = match limit {
            Some(d) => {
                let ts = types::Timespec::from(d);
                let args = types::SubmitArgs::new().timespec(&ts);
                submitter.submit_with_args(want, &args)
            }
            None => submitter.submit_and_wait(want),
        };
        match r {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME) | Some(libc::EINTR)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Takes the completions that are ready: `(user_data, result)`.
    fn completions(&mut self) -> impl Iterator<Item = (u64, i32)> {
        // At most four operations are ever in flight.
        let mut got = [(0u64, 0i32); 2 * ENTRIES as usize];
        let mut n = 0;
        for c in self.ring.completion().take(got.len()) {
            got[n] = (c.user_data(), c.result());
            n += 1;
        }
        got.into_iter().take(n)
    }
}

impl Drop for Loop<'_> {
    fn drop(&mut self) {
        if !self.recv_inflight && !self.send_inflight {
            return;
        }
        // Error path: make the kernel let go of our buffers before they are
        // freed. Shutting the socket down completes a pending receive or
        // send; the cancels cover anything else.
        let _ = self.stream.shutdown(Shutdown::Both);
        for tag in [RECV, SEND] {
            let sqe = opcode::AsyncCancel::new(tag).build().user_data(CANCEL);
            // SAFETY: a cancel refers to no memory of ours.
            let _ = unsafe { self.push(&sqe) };
        }
        let started = Instant::now();
        while self.recv_inflight || self.send_inflight {
            let r = self.wait(false, Some(Duration::from_millis(100)));
            for (tag, _) in self.completions() {
                match tag {
                    RECV => self.recv_inflight = false,
                    SEND => self.send_inflight = false,
                    _ => {}
                }
            }
            if r.is_err() || started.elapsed() > Duration::from_secs(5) {
                // Cannot prove the kernel is done with the buffers: leak
                // them rather than free memory it may still write.
                warn!("io_uring operations did not finish; leaking their buffers");
                std::mem::forget(std::mem::take(&mut self.inbuf));
                std::mem::forget(std::mem::take(&mut self.sending));
                return;
            }
        }
    }
}
