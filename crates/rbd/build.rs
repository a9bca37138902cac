//! Generates the librbd/librados bindings with bindgen from the system headers
//! (`librbd-dev`, which pulls in `librados-dev`; bindgen needs `libclang-dev`).
//! Only the functions and constants the wrapper uses are allowlisted.

use std::env;
use std::path::PathBuf;

/// The C functions the wrapper calls. Keep in sync with `src/client.rs`.
const FUNCTIONS: &[&str] = &[
    "rados_create",
    "rados_conf_read_file",
    "rados_conf_parse_env",
    "rados_conf_set",
    "rados_connect",
    "rados_shutdown",
    "rados_ioctx_create",
    "rados_ioctx_destroy",
    "rbd_version",
    "rbd_open",
    "rbd_open_read_only",
    "rbd_close",
    "rbd_get_size",
    "rbd_resize",
    "rbd_flush",
    "rbd_lock_acquire",
    "rbd_set_image_notification",
    "rbd_poll_io_events",
    "rbd_aio_create_completion",
    "rbd_aio_readv",
    "rbd_aio_writev",
    "rbd_aio_discard",
    "rbd_aio_write_zeroes",
    "rbd_aio_flush",
    "rbd_aio_get_return_value",
    "rbd_aio_get_arg",
    "rbd_aio_release",
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=wrapper.h");
    println!("cargo:rustc-link-lib=dylib=rbd");
    println!("cargo:rustc-link-lib=dylib=rados");

    let mut builder = bindgen::Builder::default()
        .header("wrapper.h")
        // Generated code must build with the workspace's rust-version.
        .rust_target(bindgen::RustTarget::stable(87, 0).expect("a Rust version bindgen knows"))
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
        // `struct iovec` is libc's: the wrapper passes `libc::iovec` slices straight through.
        .blocklist_type("iovec")
        .raw_line("use libc::iovec;")
        .allowlist_var("EVENT_TYPE_EVENTFD")
        .allowlist_type("rbd_lock_mode_t")
        .layout_tests(false)
        .generate_comments(false);
    for f in FUNCTIONS {
        builder = builder.allowlist_function(f);
    }
    let bindings = builder.generate().unwrap_or_else(|e| {
        panic!("bindgen failed on librbd.h ({e}); install librbd-dev and libclang-dev (scripts/ceph-micro.sh install)")
    });
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR")).join("bindings.rs");
    bindings.write_to_file(&out).expect("write bindings.rs");
}
