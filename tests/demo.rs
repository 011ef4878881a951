//! `ballast demo` tried as a new user would: start it, run every command its guide
//! suggests, talk WebSocket through it, and stop it.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use ballast::websocket::{self, OP_CLOSE, OP_TEXT};
use tokio::io::AsyncWriteExt;

const BIN: &str = env!("CARGO_BIN_EXE_ballast");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_the_demo_guide_suggests_works() {
    let mut demo = common::KillOnDrop(
        Command::new(BIN)
            .args(["demo", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
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
    let first = &guide[0];
    let listen: std::net::SocketAddr = first
        .split(" on ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();

    let commands: Vec<&String> = guide
        .iter()
        .filter(|l| l.starts_with("  curl ") || l.starts_with("  ballast "))
        .collect();
    assert!(commands.len() >= 6, "{guide:#?}");
    let mut outputs = Vec::new();
    for command in &commands {
        let shell = command.trim().replacen("ballast ", &format!("{BIN} "), 1);
        let out =
            tokio::task::spawn_blocking(move || Command::new("sh").args(["-c", &shell]).output())
                .await
                .unwrap()
                .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        if command.contains("Upgrade: websocket") {
            // curl holds the upgraded connection until --max-time: exit 28 after a 101.
            assert!(
                stdout.starts_with("HTTP/1.1 101 Switching Protocols"),
                "{command}: {stdout}"
            );
        } else {
            assert!(
                out.status.success(),
                "{command} failed: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        outputs.push((command.to_string(), stdout));
    }
    let output_of = |needle: &str| &outputs.iter().find(|(c, _)| c.contains(needle)).unwrap().1;
    assert!(output_of(&format!("curl http://{listen}/")).starts_with("demo-"));
    let status = output_of("ballast status");
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
