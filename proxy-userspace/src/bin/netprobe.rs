//! netprobe: echo servers that answer with their identity, and TCP/UDP/HTTP clients that
//! report, as one JSON line per attempt, which backend answered and which addresses the
//! application saw. Used by the integration tests and the demo; run it inside a network
//! namespace (`--netns`) and cgroup (`--cgroup`) of your choosing.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use serde_json::json;
use socket2::{Domain, Socket, Type};

#[derive(Parser)]
#[command(about = "Echo servers and clients for testing service load balancing")]
struct Args {
    /// Network namespace to enter first: a name under /var/run/netns or a path.
    #[arg(long, global = true)]
    netns: Option<String>,
    /// cgroup v2 directory to join first (its socket hooks then apply to our sockets).
    #[arg(long, global = true)]
    cgroup: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve until killed (or --max-secs): TCP and UDP echo answering "ID CLIENT-ADDR".
    Serve {
        #[arg(long)]
        id: String,
        #[arg(long)]
        tcp: Vec<u16>,
        #[arg(long)]
        udp: Vec<u16>,
        #[arg(long, default_value_t = 600)]
        max_secs: u64,
    },
    /// TCP connections: one JSON line each.
    Tcp {
        /// An IPv4-mapped address (`[::ffff:10.96.0.10]:80`) connects from an IPv6 socket.
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: u32,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        /// Keep each connection open this long, exchanging a line every --interval-ms,
        /// then print a summary line.
        #[arg(long, default_value_t = 0)]
        hold_ms: u64,
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
        /// Pause between connections.
        #[arg(long, default_value_t = 0)]
        gap_ms: u64,
        /// Connect from this local port (shared with other sockets, SO_REUSEADDR).
        #[arg(long)]
        source_port: Option<u16>,
        /// Length of the first line sent, newline included.
        #[arg(long, default_value_t = HELLO.len())]
        line_bytes: usize,
    },
    /// UDP requests from a new socket each: one JSON line each.
    Udp(Udp),
    /// Connection rate: connect, exchange a line, close, one after the other for
    /// --duration-ms; prints connections per second and latency percentiles.
    Rate(Timed),
    /// Request/response rate on one TCP connection: a line and its answer, back to back,
    /// for --duration-ms; prints round trips per second and latency percentiles.
    Rr(Timed),
    /// TCP SYNs written straight onto an interface (AF_PACKET) to the broadcast MAC, for
    /// datapath tests of packets no socket would send; prints how many were sent.
    Syn(Syn),
    /// HTTP GET, printed like `curl -s`.
    Http {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: u32,
    },
}

/// UDP requests (`udp`).
#[derive(clap::Args)]
struct Udp {
    /// Repeated: the requests go to each in turn. An IPv4-mapped address
    /// (`[::ffff:10.96.0.10]:53`) sends from an IPv6 socket.
    #[arg(long, required = true)]
    to: Vec<SocketAddr>,
    #[arg(long, default_value_t = 1)]
    count: u32,
    #[arg(long, default_value_t = 1000)]
    timeout_ms: u64,
    /// connect() the socket and use send/recv instead of sendto/recvfrom.
    #[arg(long)]
    connected: bool,
    /// Keep each socket this long, exchanging a datagram every --interval-ms, then
    /// print a summary line.
    #[arg(long, default_value_t = 0)]
    hold_ms: u64,
    #[arg(long, default_value_t = 100)]
    interval_ms: u64,
    /// Send from this local port.
    #[arg(long)]
    source_port: Option<u16>,
    /// Size of each request datagram (the answer is as large); larger than the MTU,
    /// it travels in fragments.
    #[arg(long, default_value_t = HELLO.len())]
    datagram_bytes: usize,
    /// Send with this IP TTL, and report ICMP errors (IP_RECVERR), e.g. time exceeded.
    #[arg(long)]
    ttl: Option<u32>,
    /// With --connected and --hold-ms: when the socket reports an error (e.g. ECONNABORTED
    /// after it was destroyed), go on with a new socket connected to the same address, as
    /// a DNS resolver does; the summary counts `reconnects`.
    #[arg(long)]
    reconnect_on_error: bool,
}

/// Raw SYNs (`syn`).
#[derive(clap::Args)]
struct Syn {
    /// The interface to write the frames on.
    #[arg(long)]
    device: String,
    /// Source address of the packets.
    #[arg(long)]
    from: std::net::Ipv4Addr,
    #[arg(long)]
    source_port: u16,
    #[arg(long)]
    to: std::net::SocketAddrV4,
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// Corrupt the IPv4 header checksum.
    #[arg(long)]
    bad_ip_checksum: bool,
}

/// A measurement against `--to` lasting `--duration-ms`.
#[derive(clap::Args)]
struct Timed {
    #[arg(long)]
    to: SocketAddr,
    #[arg(long, default_value_t = 2000)]
    duration_ms: u64,
    /// Per connect or read.
    #[arg(long, default_value_t = 1000)]
    timeout_ms: u64,
}

impl Timed {
    /// Runs `measure(to, duration, timeout)` and prints its result.
    fn print(&self, measure: fn(SocketAddr, Duration, Duration) -> serde_json::Value) {
        let result = measure(
            self.to,
            Duration::from_millis(self.duration_ms),
            Duration::from_millis(self.timeout_ms),
        );
        println!("{result}");
    }
}

fn enter(netns: Option<&str>, cgroup: Option<&PathBuf>) -> anyhow::Result<()> {
    if let Some(cgroup) = cgroup {
        let procs = cgroup.join("cgroup.procs");
        std::fs::write(&procs, std::process::id().to_string())
            .with_context(|| format!("joining cgroup {}", procs.display()))?;
    }
    if let Some(netns) = netns {
        let path = if netns.contains('/') {
            PathBuf::from(netns)
        } else {
            PathBuf::from("/var/run/netns").join(netns)
        };
        let file = std::fs::File::open(&path)
            .with_context(|| format!("opening network namespace {}", path.display()))?;
        // SAFETY: a valid namespace fd; single-threaded at this point.
        if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("entering network namespace {}", path.display()));
        }
    }
    Ok(())
}

fn error_kind(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => "refused",
        std::io::ErrorKind::HostUnreachable => "unreachable",
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => "timeout",
        _ => "other",
    }
}

fn failure(e: &std::io::Error, started: Instant) -> serde_json::Value {
    json!({"ok": false, "error": e.to_string(), "kind": error_kind(e), "ms": started.elapsed().as_secs_f64() * 1000.0})
}

/// Parses an echo answer "ID CLIENT-ADDR".
fn answer(line: &str) -> (String, String) {
    let mut parts = line.trim().splitn(2, ' ');
    (
        parts.next().unwrap_or("").to_owned(),
        parts.next().unwrap_or("").to_owned(),
    )
}

/// A socket bound to `port` on every address of one family: IPv6 ones only for IPv6, so
/// that IPv4 clients meet the IPv4 socket and see their own address (not IPv4-mapped).
fn bound(kind: Type, port: u16, v6: bool) -> anyhow::Result<Socket> {
    let (domain, protocol, any) = match v6 {
        false => (Domain::IPV4, None, SocketAddr::from(([0, 0, 0, 0], port))),
        true => (Domain::IPV6, None, SocketAddr::from(([0u16; 8], port))),
    };
    let socket = Socket::new(domain, kind, protocol)?;
    if v6 {
        socket.set_only_v6(true)?;
    }
    if kind == Type::STREAM {
        // As std's TcpListener: a restarted server binds again at once.
        socket.set_reuse_address(true)?;
    }
    socket
        .bind(&any.into())
        .with_context(|| format!("binding {kind:?} port {port} on {any}"))?;
    Ok(socket)
}

fn serve(id: String, tcp: Vec<u16>, udp: Vec<u16>, max_secs: u64) -> anyhow::Result<()> {
    for (port, v6) in tcp.iter().flat_map(|p| [(*p, false), (*p, true)]) {
        let socket = bound(Type::STREAM, port, v6)?;
        // As std's TcpListener on Linux: the kernel's maximum backlog.
        socket.listen(-1)?;
        let listener = TcpListener::from(socket);
        let id = id.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let id = id.clone();
                std::thread::spawn(move || serve_tcp(stream, &id));
            }
        });
    }
    for (port, v6) in udp.iter().flat_map(|p| [(*p, false), (*p, true)]) {
        let socket = UdpSocket::from(bound(Type::DGRAM, port, v6)?);
        let id = id.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, peer)) = socket.recv_from(&mut buf) {
                // As long as the request (padded after the line), so that a large datagram
                // is answered by one as large.
                let mut answer = format!("{id} {peer}\n").into_bytes();
                if answer.len() < n {
                    answer.resize(n, b' ');
                }
                let _ = socket.send_to(&answer, peer);
            }
        });
    }
    println!("{}", json!({"serving": id}));
    std::thread::sleep(Duration::from_secs(max_secs));
    Ok(())
}

fn serve_tcp(stream: TcpStream, id: &str) {
    let Ok(peer) = stream.peer_addr() else { return };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    let _ = stream.set_nodelay(true);
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut lines = BufReader::new(stream).lines();
    while let Some(Ok(line)) = lines.next() {
        if line.starts_with("GET ") {
            // Read the rest of the request head, then answer like a tiny web server.
            for header in lines.by_ref() {
                if header.map_or(true, |h| h.is_empty()) {
                    break;
                }
            }
            let body = format!("hello from {id} (you are {peer})\n");
            let _ = write!(
                writer,
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            return;
        }
        // One write: pieces would wait for ACKs (Nagle) on a long connection.
        if writer
            .write_all(format!("{id} {peer}\n").as_bytes())
            .is_err()
        {
            return;
        }
    }
}

const HELLO: &[u8] = b"hello\n";

/// Sends `line` (ending in a newline) and reads the answer line.
fn exchange(
    reader: &mut BufReader<TcpStream>,
    writer: &mut TcpStream,
    line: &[u8],
) -> std::io::Result<String> {
    writer.write_all(line)?;
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    Ok(line)
}

/// A socket bound to `0.0.0.0:port` (or any port), which other sockets may share.
/// A socket of the family of `to` (an IPv4-mapped IPv6 address gets an IPv6 socket, as a
/// dual-stack application has), bound to `port` if given.
fn socket_from(kind: Type, port: Option<u16>, to: SocketAddr) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(to), kind, None)?;
    if let Some(port) = port {
        socket.set_reuse_address(true)?;
        let any = match to {
            SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], port)),
            SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], port)),
        };
        socket.bind(&any.into())?;
    }
    Ok(socket)
}

/// Reports ICMP errors (time exceeded among them) to the socket's user: without
/// IP_RECVERR, Linux reports only hard errors (port unreachable) on a UDP socket.
fn recv_errors(socket: &Socket, to: SocketAddr) -> std::io::Result<()> {
    let on: libc::c_int = 1;
    let (level, option) = match to {
        SocketAddr::V4(_) => (libc::IPPROTO_IP, libc::IP_RECVERR),
        SocketAddr::V6(_) => (libc::IPPROTO_IPV6, libc::IPV6_RECVERR),
    };
    // SAFETY: a valid socket and an int option of the size passed.
    let ret = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(socket),
            level,
            option,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn connect_from(
    to: SocketAddr,
    source_port: Option<u16>,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let socket = socket_from(Type::STREAM, source_port, to)?;
    socket.connect_timeout(&to.into(), timeout)?;
    Ok(socket.into())
}

fn tcp_once(
    to: SocketAddr,
    source_port: Option<u16>,
    line_bytes: usize,
    timeout: Duration,
    hold: Duration,
    interval: Duration,
) -> serde_json::Value {
    let started = Instant::now();
    let stream = match connect_from(to, source_port, timeout) {
        Ok(s) => s,
        Err(e) => return failure(&e, started),
    };
    let _ = stream.set_read_timeout(Some(timeout));
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => return failure(&e, started),
    };
    let mut reader = BufReader::new(stream);
    // A long first line: segments as large as the path allows (path-MTU discovery).
    let mut first_line = vec![b'x'; line_bytes.saturating_sub(1)];
    first_line.push(b'\n');
    let (backend, server_saw) = match exchange(&mut reader, &mut writer, &first_line) {
        Ok(line) => answer(&line),
        Err(e) => return failure(&e, started),
    };
    let first = json!({"ok": true, "backend": backend, "server_saw": server_saw, "peer": peer, "ms": started.elapsed().as_secs_f64() * 1000.0});
    let result = hold_on(first, started, hold, interval, || {
        exchange(&mut reader, &mut writer, HELLO)
    });
    close_after_the_server(&mut reader, &writer);
    result
}

/// Closes our side and waits (up to the read timeout) for the server to close its own, so
/// that the connection is over on both ends when we return: a client connecting again from
/// the same port to the same server then finds its tuple in TIME_WAIT, which the kernel
/// lets it reuse, and not still in FIN_WAIT, which it refuses (EADDRNOTAVAIL).
fn close_after_the_server(reader: &mut BufReader<TcpStream>, writer: &TcpStream) {
    if writer.shutdown(std::net::Shutdown::Write).is_ok() {
        let _ = std::io::copy(reader, &mut std::io::sink());
    }
}

/// Keeps a flow open until `hold` has passed since `started`, one `exchange` per
/// `interval`; prints `first` at once and returns a summary (or `first` if not holding).
fn hold_on(
    first: serde_json::Value,
    started: Instant,
    hold: Duration,
    interval: Duration,
    mut exchange: impl FnMut() -> std::io::Result<String>,
) -> serde_json::Value {
    if hold.is_zero() {
        return first;
    }
    println!("{first}");
    let _ = std::io::stdout().flush();
    let backend = first["backend"].as_str().unwrap_or_default().to_owned();
    let (mut exchanges, mut failures) = (0u32, 0u32);
    // When the first exchanges that failed began, to line them up with what the test did.
    let mut failed_at_ms = Vec::new();
    let mut last_backend = backend.clone();
    while started.elapsed() < hold {
        std::thread::sleep(interval);
        exchanges += 1;
        let at = started.elapsed().as_millis() as u64;
        match exchange() {
            Ok(line) => last_backend = answer(&line).0,
            Err(_) => {
                failures += 1;
                if failed_at_ms.len() < 10 {
                    failed_at_ms.push(at);
                }
            }
        }
    }
    json!({"hold": true, "backend": backend, "last_backend": last_backend, "exchanges": exchanges, "failures": failures, "failed_at_ms": failed_at_ms})
}

/// One UDP flow from a new socket: a request and its answer, then, when holding, more
/// exchanges on the same socket (so on the same backend).
fn udp_once(to: SocketAddr, args: &Udp) -> serde_json::Value {
    let timeout = Duration::from_millis(args.timeout_ms);
    let (connected, source_port, ttl) = (args.connected, args.source_port, args.ttl);
    let started = Instant::now();
    let open = || -> std::io::Result<UdpSocket> {
        let s = socket_from(Type::DGRAM, source_port.or(Some(0)), to)?;
        if let Some(ttl) = ttl {
            if to.is_ipv4() {
                s.set_ttl_v4(ttl)?;
            } else {
                s.set_unicast_hops_v6(ttl)?;
            }
            recv_errors(&s, to)?;
        }
        let s = UdpSocket::from(s);
        s.set_read_timeout(Some(timeout))?;
        if connected {
            s.connect(to)?;
        }
        Ok(s)
    };
    let socket = match open() {
        Ok(s) => std::cell::RefCell::new(s),
        Err(e) => return failure(&e, started),
    };
    let mut request = HELLO.to_vec();
    request.resize(args.datagram_bytes.max(HELLO.len()), b' ');
    let exchange = || -> std::io::Result<(String, SocketAddr)> {
        let socket = socket.borrow();
        let mut buf = vec![0u8; 65536];
        let (n, from) = if connected {
            socket.send(&request)?;
            (socket.recv(&mut buf)?, socket.peer_addr()?)
        } else {
            socket.send_to(&request, to)?;
            socket.recv_from(&mut buf)?
        };
        if n < request.len() {
            return Err(std::io::Error::other(format!(
                "sent {} bytes, the answer has only {n}",
                request.len()
            )));
        }
        Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
    };
    let (line, from) = match exchange() {
        Ok(answer) => answer,
        Err(e) => return failure(&e, started),
    };
    let (backend, server_saw) = answer(&line);
    let first = json!({"ok": true, "backend": backend, "server_saw": server_saw, "peer": from.to_string(), "ms": started.elapsed().as_secs_f64() * 1000.0});
    let mut reconnects = 0u32;
    let mut summary = hold_on(
        first,
        started,
        Duration::from_millis(args.hold_ms),
        Duration::from_millis(args.interval_ms),
        || {
            let result = exchange();
            // A timeout is a lost datagram; any other error is the socket's own.
            if let Err(e) = &result
                && args.reconnect_on_error
                && !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                )
                && let Ok(fresh) = open()
            {
                socket.replace(fresh);
                reconnects += 1;
            }
            result.map(|(line, _)| line)
        },
    );
    if args.reconnect_on_error {
        summary["reconnects"] = reconnects.into();
    }
    summary
}

/// Sequential connections for `duration`: each connect + one exchange + close. Latency is
/// that of connect(): the round trip of the connection's first packet. Each connection is
/// closed with a reset (linger 0): thousands of TIME_WAIT tuples to one destination would
/// make the client's own search for a free port the cost measured, and it grows with the
/// run's length, more for one destination (a pod, a ClusterIP) than for several.
fn rate(to: SocketAddr, duration: Duration, timeout: Duration) -> serde_json::Value {
    let started = Instant::now();
    let mut latencies = Vec::new();
    let mut failures = 0u64;
    while started.elapsed() < duration {
        let attempt = Instant::now();
        let result = TcpStream::connect_timeout(&to, timeout).and_then(|s| {
            let connected = attempt.elapsed();
            socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
            s.set_read_timeout(Some(timeout))?;
            let mut writer = s.try_clone()?;
            exchange(&mut BufReader::new(s), &mut writer, HELLO).map(|_| connected)
        });
        match result {
            Ok(connected) => latencies.push(connected.as_secs_f64() * 1e6),
            Err(_) => failures += 1,
        }
    }
    latencies.sort_by(f64::total_cmp);
    json!({
        "connections": latencies.len(),
        "failures": failures,
        "per_second": latencies.len() as f64 / started.elapsed().as_secs_f64(),
        "connect_p50_us": percentile(&latencies, 0.5),
        "connect_p99_us": percentile(&latencies, 0.99),
    })
}

/// The `p` quantile of sorted `values`; NaN if there are none.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 - 1.0) * p) as usize)
        .copied()
        .unwrap_or(f64::NAN)
}

/// Back-to-back round trips (a line, its answer) on one connection for `duration`.
fn round_trips(to: SocketAddr, duration: Duration, timeout: Duration) -> serde_json::Value {
    let started = Instant::now();
    let stream = match TcpStream::connect_timeout(&to, timeout) {
        Ok(s) => s,
        Err(e) => return failure(&e, started),
    };
    let setup = stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_nodelay(true))
        .and_then(|()| stream.try_clone());
    let mut writer = match setup {
        Ok(w) => w,
        Err(e) => return failure(&e, started),
    };
    let mut reader = BufReader::new(stream);
    let mut latencies = Vec::new();
    let started = Instant::now();
    while started.elapsed() < duration {
        let attempt = Instant::now();
        if let Err(e) = exchange(&mut reader, &mut writer, HELLO) {
            return failure(&e, started);
        }
        latencies.push(attempt.elapsed().as_secs_f64() * 1e6);
    }
    let per_second = latencies.len() as f64 / started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    json!({
        "ok": true,
        "round_trips": latencies.len(),
        "per_second": per_second,
        "p50_us": percentile(&latencies, 0.5),
        "p99_us": percentile(&latencies, 0.99),
    })
}

fn http_once(to: SocketAddr) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(2))
        .with_context(|| format!("connecting to {to}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(stream, "GET / HTTP/1.0\r\nHost: {to}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response.lines().next().unwrap_or("").to_owned();
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .trim_end()
        .to_owned();
    Ok(format!("GET http://{to}/ -> {status}: {body}"))
}

/// One's-complement sum of `bytes` as big-endian 16-bit words, folded.
fn ones_complement_sum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// An Ethernet frame to the broadcast MAC with a TCP SYN from `from:sport` to `to`.
fn syn_frame(src_mac: [u8; 6], syn: &Syn) -> Vec<u8> {
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&syn.from.octets());
    ip[16..20].copy_from_slice(&syn.to.ip().octets());
    let mut csum = !ones_complement_sum(&ip);
    if syn.bad_ip_checksum {
        csum ^= 0x5a5a;
    }
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&syn.source_port.to_be_bytes());
    tcp[2..4].copy_from_slice(&syn.to.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = Vec::with_capacity(32);
    pseudo.extend_from_slice(&ip[12..20]);
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    pseudo.extend_from_slice(&tcp);
    tcp[16..18].copy_from_slice(&(!ones_complement_sum(&pseudo)).to_be_bytes());
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&src_mac);
    frame.extend_from_slice(&[0x08, 0x00]);
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&tcp);
    frame
}

fn send_syns(syn: &Syn) -> anyhow::Result<u32> {
    let mac_text = std::fs::read_to_string(format!("/sys/class/net/{}/address", syn.device))
        .with_context(|| format!("reading the MAC address of {}", syn.device))?;
    let mut src_mac = [0u8; 6];
    for (byte, hex) in src_mac.iter_mut().zip(mac_text.trim().split(':')) {
        *byte = u8::from_str_radix(hex, 16).context("a MAC address byte")?;
    }
    let name = std::ffi::CString::new(syn.device.as_str())?;
    // SAFETY: a valid C string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    anyhow::ensure!(ifindex != 0, "no interface {}", syn.device);
    let socket = Socket::new(
        Domain::PACKET,
        Type::RAW,
        Some(socket2::Protocol::from(i32::from(
            (libc::ETH_P_ALL as u16).to_be(),
        ))),
    )
    .context("opening an AF_PACKET socket")?;
    // SAFETY: sockaddr_ll is plain data; the fields set are those sendto reads.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = ifindex as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].fill(0xff);
    let frame = syn_frame(src_mac, syn);
    for _ in 0..syn.count {
        // SAFETY: a valid socket, frame and address of the sizes passed.
        let sent = unsafe {
            libc::sendto(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        anyhow::ensure!(
            sent == frame.len() as isize,
            "sending a frame on {}: {}",
            syn.device,
            std::io::Error::last_os_error()
        );
    }
    Ok(syn.count)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    enter(args.netns.as_deref(), args.cgroup.as_ref())?;
    match args.command {
        Command::Serve {
            id,
            tcp,
            udp,
            max_secs,
        } => serve(id, tcp, udp, max_secs)?,
        Command::Tcp {
            to,
            count,
            timeout_ms,
            hold_ms,
            interval_ms,
            gap_ms,
            source_port,
            line_bytes,
        } => {
            for _ in 0..count {
                let result = tcp_once(
                    to,
                    source_port,
                    line_bytes,
                    Duration::from_millis(timeout_ms),
                    Duration::from_millis(hold_ms),
                    Duration::from_millis(interval_ms),
                );
                println!("{result}");
                std::thread::sleep(Duration::from_millis(gap_ms));
            }
        }
        Command::Udp(udp) => {
            for i in 0..udp.count as usize {
                println!("{}", udp_once(udp.to[i % udp.to.len()], &udp));
            }
        }
        Command::Syn(syn) => println!("{}", json!({"sent": send_syns(&syn)?})),
        Command::Rate(timed) => timed.print(rate),
        Command::Rr(timed) => timed.print(round_trips),
        Command::Http { to, count } => {
            for _ in 0..count {
                match http_once(to) {
                    Ok(line) => println!("{line}"),
                    Err(e) => println!("GET http://{to}/ failed: {e:#}"),
                }
            }
        }
    }
    Ok(())
}
