//! `tollgate-floor`, the load benchmark's reference proxy, on real sockets: it forwards
//! method, path, query and body to its upstream, drops `Authorization`, and returns the
//! upstream's answer unchanged.

// Test helpers outside `#[test]` fns are not covered by clippy.toml's test allowance.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};

/// Kills the proxy when the test ends, however it ends.
struct Proxy(Child);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `tollgate-floor` on a free port; returns it and the address it announced.
fn start(upstream: &str) -> (Proxy, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate-floor"))
        .args(["--listen", "127.0.0.1:0", "--upstream", upstream])
        .args(["--workers", "1"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .split_whitespace()
        .skip_while(|w| *w != "on")
        .nth(1)
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_owned();
    (Proxy(child), addr)
}

/// Reads one HTTP/1.1 request (head and `content-length` body) off `stream`.
fn read_request(stream: &mut std::net::TcpStream) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).unwrap();
    let len = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse::<usize>().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).unwrap();
    head + &String::from_utf8(body).unwrap()
}

#[test]
fn forwards_the_request_without_the_credential_and_returns_the_answer() {
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let up_addr = upstream.local_addr().unwrap().to_string();
    let (_proxy, addr) = start(&up_addr);

    let seen = std::thread::spawn(move || {
        let (mut s, _) = upstream.accept().unwrap();
        let request = read_request(&mut s);
        let body = r#"{"ok":true}"#;
        write!(
            s,
            "HTTP/1.1 201 Created\r\ncontent-type: application/json\r\nx-up: 1\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        request
    });

    let mut client = std::net::TcpStream::connect(&addr).unwrap();
    let body = r#"{"model":"m"}"#;
    write!(
        client,
        "POST /v1/chat/completions?x=1 HTTP/1.1\r\nhost: example\r\nauthorization: Bearer secret-key\r\nx-keep: yes\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let answer = read_request(&mut client);
    let request = seen.join().unwrap();

    assert!(
        request.starts_with("POST /v1/chat/completions?x=1 HTTP/1.1\r\n"),
        "{request}"
    );
    assert!(request.ends_with(body), "{request}");
    assert!(
        request.to_ascii_lowercase().contains("x-keep: yes"),
        "{request}"
    );
    assert!(!request.contains("secret-key"), "{request}");
    assert!(answer.starts_with("HTTP/1.1 201 Created\r\n"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("x-up: 1"), "{answer}");
    assert!(answer.ends_with(r#"{"ok":true}"#), "{answer}");
}
