//! A page's `Debug` (and so that of every message carrying pages) never
//! shows its bytes: they are guest memory.

use pageserver_proto::v1::{Page, PagesReply};
use prost::bytes::Bytes;

#[test]
fn debug_of_a_page_and_of_a_reply_shows_no_page_bytes() {
    let secret = b"SECRET-GUEST-BYTES".repeat(4);
    let page = Page { region: 1, index: 7, zero: false, data: Bytes::from(secret.clone()) };
    let shown = [
        format!("{page:?}"),
        format!("{page:#?}"),
        format!("{:?}", PagesReply { pages: vec![page.clone()], ..PagesReply::default() }),
    ];
    for text in shown {
        assert!(!text.contains("SECRET"), "{text}");
        assert!(!text.contains("83, 69, 67"), "{text}");
        assert!(text.contains("index: 7") && text.contains("<72 bytes, not shown>"), "{text}");
    }
}
