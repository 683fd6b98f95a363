//! A source agent serving a memory file, over real gRPC on 127.0.0.1.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{PAGE_SIZE, RunningServer, bitmap_chunks, dirty_pages, page_pattern};
use pageserver_proto::v1::{GetLayoutRequest, GetPageRequest, PagesReply, PagesRequest};
use source_agent::{SourceAgent, SourceMemory};
use tonic::Code;

const PAGES: u64 = 600;
const ZERO_PAGES: [u64; 2] = [5, 9];

/// Writes the test's memory file: patterned pages, except two zero pages.
fn write_memory_file(path: &Path) {
    let mut content = Vec::with_capacity((PAGES * PAGE_SIZE) as usize);
    for page in 0..PAGES {
        if ZERO_PAGES.contains(&page) {
            content.extend(std::iter::repeat_n(0u8, PAGE_SIZE as usize));
        } else {
            content.extend(page_pattern(page, 0));
        }
    }
    std::fs::write(path, content).expect("write memory file");
}

async fn start() -> (tempfile::TempDir, RunningServer) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("guest.mem");
    write_memory_file(&path);
    let memory = SourceMemory::open_file(&path, PAGE_SIZE).expect("open memory file");
    let agent = Arc::new(SourceAgent::with_memory("test-vm", memory));
    (dir, RunningServer::start(agent).await)
}

#[tokio::test]
async fn layout_and_single_pages() {
    let (_dir, server) = start().await;
    let mut client = server.client().await;

    let layout = client.get_layout(GetLayoutRequest {}).await.expect("GetLayout").into_inner();
    assert_eq!(layout.page_size, PAGE_SIZE);
    assert_eq!(layout.total_pages, PAGES);
    assert_eq!(layout.epoch, 1);
    assert!(layout.paused);
    assert_eq!(layout.vm, "test-vm");
    assert_eq!(layout.memory_source, "file");
    assert_eq!(layout.regions.len(), 1);
    let region = &layout.regions[0];
    assert_eq!((region.index, region.size_bytes, region.page_count), (0, PAGES * PAGE_SIZE, PAGES));

    for index in [0, 1, 17, PAGES - 1] {
        let page = client.get_page(GetPageRequest { region: 0, index }).await.expect("GetPage").into_inner();
        assert_eq!((page.region, page.index, page.zero), (0, index, false));
        assert_eq!(page.data, page_pattern(index, 0), "content of page {index}");
    }
    let zero = client.get_page(GetPageRequest { region: 0, index: 5 }).await.expect("GetPage").into_inner();
    assert!(zero.zero && zero.data.is_empty());

    let unknown = client.get_page(GetPageRequest { region: 1, index: 0 }).await.expect_err("region 1");
    assert_eq!(unknown.code(), Code::NotFound);
    assert!(unknown.message().contains("region 1"), "{}", unknown.message());
    let beyond = client.get_page(GetPageRequest { region: 0, index: PAGES }).await.expect_err("past the end");
    assert_eq!(beyond.code(), Code::OutOfRange);
    assert!(beyond.message().contains(&format!("page {PAGES}")), "{}", beyond.message());
    assert!(beyond.message().contains(&format!("{PAGES} pages")), "{}", beyond.message());
    server.stop().await;
}

fn request(request_id: u64, region: u32, first_index: u64, count: u32) -> PagesRequest {
    PagesRequest { request_id, region, first_index, count, require_paused: false }
}

#[tokio::test]
async fn get_pages_answers_every_request() {
    let (_dir, server) = start().await;
    let mut client = server.client().await;
    let mut requests = vec![
        request(1, 0, 0, 8),
        request(2, 0, 0, 513), // 513 × 4 KiB > 2 MiB
        request(3, 7, 0, 1),
        request(4, 0, PAGES - 2, 4),
        request(5, 0, 50, 512), // exactly 2 MiB
        request(6, 0, 3, 0),
        request(7, 0, PAGES, 1),
    ];
    // Many small requests sent before any reply is read.
    requests.extend((0..300).map(|i| request(100 + i, 0, i, 1)));
    let expected_errors = [(2, Code::InvalidArgument), (3, Code::NotFound), (4, Code::OutOfRange)];
    let expected_errors = expected_errors.into_iter().chain([(6, Code::InvalidArgument), (7, Code::OutOfRange)]);
    let expected_errors: std::collections::HashMap<u64, Code> = expected_errors.collect();

    let mut replies = client.get_pages(tokio_stream::iter(requests.clone())).await.expect("GetPages").into_inner();
    let mut answered = std::collections::HashMap::<u64, PagesReply>::new();
    while let Some(reply) = replies.message().await.expect("reply") {
        assert!(answered.insert(reply.request_id, reply).is_none(), "one reply per request");
    }
    assert_eq!(answered.len(), requests.len());
    for request in &requests {
        let reply = &answered[&request.request_id];
        if let Some(code) = expected_errors.get(&request.request_id) {
            let error = reply.error.as_ref().expect("an error reply");
            assert_eq!(error.code, *code as i32, "request {}: {}", request.request_id, error.message);
            assert!(reply.pages.is_empty());
            if request.request_id == 2 {
                assert!(error.message.starts_with("oversized batch"), "{}", error.message);
            }
            continue;
        }
        assert!(reply.error.is_none(), "request {}: {:?}", request.request_id, reply.error);
        assert_eq!(reply.pages.len(), request.count as usize);
        for (i, page) in reply.pages.iter().enumerate() {
            let index = request.first_index + i as u64;
            assert_eq!((page.region, page.index), (request.region, index));
            if ZERO_PAGES.contains(&index) {
                assert!(page.zero && page.data.is_empty(), "page {index} is zero");
            } else {
                assert!(!page.zero);
                assert_eq!(page.data, page_pattern(index, 0), "content of page {index}");
            }
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn file_bitmaps_hold_every_page_at_epoch_1() {
    let (_dir, server) = start().await;
    let mut client = server.client().await;

    let (bitmap, pages) = dirty_pages(&mut client, 0, false).await.expect("since 0");
    assert_eq!(bitmap.epoch, 1);
    assert!(bitmap.paused);
    assert_eq!(pages, (0..PAGES).collect::<Vec<_>>());

    let (bitmap, pages) = dirty_pages(&mut client, 1, false).await.expect("since 1");
    assert_eq!(bitmap.epoch, 1);
    assert!(pages.is_empty());
    let chunks = bitmap_chunks(&mut client, 1, false).await.expect("since 1");
    assert_eq!(chunks.len(), 1);
    assert!(chunks[0].last && chunks[0].runs.is_empty());

    let too_new = bitmap_chunks(&mut client, 99, false).await.expect_err("since 99");
    assert_eq!(too_new.code(), Code::InvalidArgument);
    assert!(too_new.message().contains("epoch 99") && too_new.message().contains("newest epoch 1"));

    let (bitmap, pages) = dirty_pages(&mut client, 0, true).await.expect("final bitmap of a file");
    assert!(bitmap.paused);
    assert_eq!(pages.len() as u64, PAGES);
    server.stop().await;
}

#[test]
fn memory_file_of_less_than_a_page_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tiny.mem");
    std::fs::write(&path, [1u8; 100]).expect("write");
    let error = SourceMemory::open_file(&path, PAGE_SIZE).expect_err("less than a page");
    assert!(error.to_string().contains("less than one 4096-byte page"), "{error}");
    let error = SourceMemory::open_file(&dir.path().join("missing"), PAGE_SIZE).expect_err("missing");
    assert!(error.to_string().contains("missing"), "{error}");
}

/// A partial page at the end is refused, with the numbers: served, it
/// would be guest memory that nobody can have.
#[test]
fn a_partial_page_at_the_end_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("guest.mem");
    write_memory_file(&path);
    let mut content = std::fs::read(&path).expect("read");
    content.extend([0xAB; 100]);
    std::fs::write(&path, content).expect("write");
    let error = SourceMemory::open_file(&path, PAGE_SIZE).expect_err("a partial page");
    let message = error.to_string();
    for part in [format!("holds {} bytes", PAGES * PAGE_SIZE + 100), "4096-byte pages".into(), "100 bytes past".into()]
    {
        assert!(message.contains(&part), "{part:?} missing from: {message}");
    }
}
