//! Prints a port for a script to tell a process to listen on: the tests' own choice (see
//! `laabam_tests::ports`), so the scripts draw ports the same way.

fn main() {
    println!("{}", laabam_tests::ports::free_port());
}
