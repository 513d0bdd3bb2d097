//! Commands (`losetup`, `mount`, `mkfs`...) as their callers report them:
//! one line with the program and its arguments, the same in the agent's
//! and the node plugin's error messages.

use std::ffi::OsStr;

/// A command as one line for messages: the program and its arguments.
pub fn line(program: &str, args: &[&OsStr]) -> String {
    let mut line = program.to_string();
    for arg in args {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_line_is_the_program_and_its_arguments() {
        let args: [&OsStr; 2] = ["--detach".as_ref(), "/dev/loop3".as_ref()];
        assert_eq!(line("losetup", &args), "losetup --detach /dev/loop3");
        assert_eq!(line("true", &[]), "true");
    }
}
