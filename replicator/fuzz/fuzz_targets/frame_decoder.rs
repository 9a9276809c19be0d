//! The frame decoder: raw streams, framed payloads that pass the MAC (so the fuzzer reaches
//! decompression and message decoding), message payloads alone, and the handshake.
#![no_main]

use libfuzzer_sys::fuzz_target;
use replicator::auth::{self, ReplicationKey};
use replicator::wire::{
    frame_header, Direction, FrameAuth, FrameReader, Message, CONNECTION_NONCE_LEN, FLAG_ZSTD,
};

const KEY: &[u8] = b"fuzzing key, fuzzing key, fuzzing key";
const NONCE: [u8; CONNECTION_NONCE_LEN] = [3; CONNECTION_NONCE_LEN];

fn auth() -> FrameAuth {
    FrameAuth::new(KEY, &NONCE, Direction::ToStandby)
}

fn drain(bytes: &[u8], max_payload: u32) {
    let mut r = FrameReader::new(bytes, auth());
    r.set_max_payload(max_payload);
    while r.recv().is_ok() {}
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        // A raw stream: refused at the magic, length or MAC.
        0 => drain(rest, 1 << 20),
        // Authentic frames whose payloads are the fuzzer's: `rest` is cut in pieces of
        // (flags byte, announced length u16, length u16, bytes).
        1 => {
            let mut stream = Vec::new();
            let mut input = rest;
            let mut seq = 0;
            while input.len() >= 5 {
                let flags = input[0] & (FLAG_ZSTD | 0x80);
                let raw_len = u32::from(u16::from_le_bytes([input[1], input[2]]));
                let len =
                    usize::from(u16::from_le_bytes([input[3], input[4]])).min(input.len() - 5);
                let wire = &input[5..5 + len];
                stream.extend_from_slice(&frame_header(&auth(), seq, flags, wire, raw_len));
                stream.extend_from_slice(wire);
                input = &input[5 + len..];
                seq += 1;
            }
            drain(&stream, 1 << 16);
        }
        // A message payload alone; what decodes must encode back to the same message.
        2 => {
            if let Ok(msg) = Message::decode(rest) {
                let again = Message::decode(&msg.encode().expect("encodes")).expect("decodes");
                assert_eq!(again, msg);
            }
        }
        // The standby's side of the handshake.
        _ => {
            let key = ReplicationKey::new(KEY.to_vec()).expect("long enough");
            let mut input = rest;
            let _ = auth::authenticate_standby(&mut input, &mut Vec::new(), &key);
        }
    }
});
