//! The checked-in header is what cbindgen makes from the crate now.

use std::path::Path;

#[test]
fn header_is_up_to_date() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_crate(crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header");
    let mut generated = Vec::new();
    bindings.write(&mut generated);
    let generated = String::from_utf8(generated).expect("the header is UTF-8");
    let header = crate_dir.join("include/domsnap.h");
    if std::env::var_os("DOMSNAP_UPDATE_HEADER").is_some() {
        std::fs::write(&header, &generated).expect("write the header");
    }
    let checked_in = std::fs::read_to_string(&header).unwrap_or_default();
    assert!(
        checked_in == generated,
        "{} is out of date: run `DOMSNAP_UPDATE_HEADER=1 cargo test -p domsnap-capi --test header` \
         and commit it",
        header.display()
    );
}
