//! Feeds arbitrary bytes to the QMP framing and message classifier: any input must give a
//! message or an error, never a panic, and framing must respect its length bound.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = qmp::wire::parse_server_message(data);
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    runtime.block_on(async {
        let mut reader = qmp::wire::MessageReader::new(data, 256);
        while let Ok(Some(message)) = reader.next_message().await {
            assert!(message.len() <= 256);
            let _ = qmp::wire::parse_server_message(&message);
        }
    });
});
