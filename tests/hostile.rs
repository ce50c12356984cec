//! Hostile input: targets, files and clients that try to hurt a root memprof.

mod common;
