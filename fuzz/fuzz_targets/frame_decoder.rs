//! Feeds arbitrary bytes to the frame decoders: header, request and reply.
//! Any panic, overflow or out-of-bounds access is a bug.
#![no_main]

use dmem_memnode::protocol::{decode_reply, decode_request, encode_request, Header, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < HEADER_LEN {
        return;
    }
    let (head, payload) = data.split_at(HEADER_LEN);
    if let Ok(h) = Header::decode(head.try_into().expect("16 bytes")) {
        assert!(h.len as usize <= dmem_memnode::protocol::MAX_PAYLOAD);
        if let Ok(req) = decode_request(h.op, payload) {
            // What decodes must re-encode to the same bytes.
            let mut again = Vec::new();
            encode_request(&mut again, h.req_id, &req);
            assert_eq!(&again[HEADER_LEN..], payload);
        }
        let _ = decode_reply(h.op, payload);
    }
    // Also try the payload decoders on every opcode, header or not.
    let _ = decode_request(data[2], &data[HEADER_LEN..]);
    let _ = decode_reply(data[2], &data[HEADER_LEN..]);
});
