//! `ballast demo` tried as a new user would: start it, run every command its guide
//! suggests, talk WebSocket through it, and stop it.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use ballast::websocket::{self, OP_CLOSE, OP_TEXT};
use tokio::io::AsyncWriteExt;

const BIN: &str = env!("CARGO_BIN_EXE_ballast");

/// Starts `ballast demo` on ports of its choosing with `path` as its `PATH`, and reads its
/// guide up to the last line.
fn start_demo(path: &std::ffi::OsStr) -> (common::KillOnDrop, Vec<String>) {
    let mut demo = common::KillOnDrop(
        Command::new(BIN)
            .args(["demo", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .env("PATH", path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = BufReader::new(demo.0.stdout.take().unwrap());
    let mut guide = Vec::new();
    for line in stdout.lines() {
        let line = line.unwrap();
        let done = line.contains("Ctrl-C stops the demo");
        guide.push(line);
        if done {
            break;
        }
    }
    (demo, guide)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_the_demo_guide_suggests_works() {
    let (demo, guide) = start_demo(&std::env::var_os("PATH").unwrap_or_default());
    let first = &guide[0];
    let listen: std::net::SocketAddr = first
        .split(" on ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();

    // A command is a line of two spaces and then a non-space; explanations are deeper.
    let commands: Vec<&String> = guide
        .iter()
        .filter(|l| l.starts_with("  ") && !l[2..].starts_with(' '))
        .collect();
    assert!(commands.len() >= 6, "{guide:#?}");
    // The test binary is on nobody's PATH, so the guide names it by its full path.
    let bin = std::fs::canonicalize(BIN).unwrap();
    let status_line = format!("  {} status --admin ", bin.display());
    assert!(
        commands.iter().any(|c| c.starts_with(&status_line)),
        "no {status_line:?} in {guide:#?}"
    );
    let mut outputs = Vec::new();
    for command in &commands {
        // Exactly as printed, from the repository root, as a user pastes it.
        let shell = command.trim().to_string();
        let out = tokio::task::spawn_blocking(move || {
            Command::new("sh")
                .args(["-c", &shell])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .output()
        })
        .await
        .unwrap()
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{command} failed ({}): {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        outputs.push((command.to_string(), stdout));
    }
    let output_of = |needle: &str| &outputs.iter().find(|(c, _)| c.contains(needle)).unwrap().1;
    assert!(output_of(&format!("curl http://{listen}/")).starts_with("demo-"));
    assert_eq!(
        output_of("Upgrade: websocket"),
        "HTTP/1.1 101 Switching Protocols\nhello\n"
    );
    let status = output_of(" status --admin ");
    for name in ["demo-1", "demo-2", "demo-3"] {
        assert!(status.contains(name), "{status}");
    }
    assert!(output_of("/drain").contains("\"draining\""));
    assert!(output_of("/metrics").contains("ballast_backend_connections_total"));

    // A WebSocket message through ballast comes back; a Close is answered.
    let mut ws = tokio::net::TcpStream::connect(listen).await.unwrap();
    ws.write_all(b"GET / HTTP/1.1\r\nHost: demo\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").await.unwrap();
    let (head, mut buf) = common::read_answer_head(&mut ws).await;
    assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
    ws.write_all(&websocket::encode_masked_frame(
        OP_TEXT,
        b"hello ballast",
        [9, 8, 7, 6],
    ))
    .await
    .unwrap();
    assert_eq!(
        common::read_frame(&mut ws, &mut buf).await,
        (OP_TEXT, b"hello ballast".to_vec())
    );
    ws.write_all(&websocket::encode_masked_frame(
        OP_CLOSE,
        &1000u16.to_be_bytes(),
        [1, 2, 3, 4],
    ))
    .await
    .unwrap();
    assert_eq!(common::read_frame(&mut ws, &mut buf).await.0, OP_CLOSE);

    let exit = common::terminate(demo).await;
    assert!(exit.success(), "{exit:?}");
}

#[test]
fn the_guide_says_plain_ballast_when_that_name_on_the_path_is_this_binary() {
    let dir = std::path::Path::new(BIN).parent().unwrap();
    let path = std::env::join_paths(std::iter::once(dir.to_path_buf()).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))
    .unwrap();
    let (_demo, guide) = start_demo(&path);
    assert!(
        guide
            .iter()
            .any(|l| l.starts_with("  ballast status --admin ")),
        "{guide:#?}"
    );
}
