//! Names a setting the way whoever set it wrote it. Every setting is a flag and a `LAABAM_*`
//! variable, and in a container or a Kubernetes manifest only the variables are written: a
//! refusal that says `--batch` to someone who wrote `LAABAM_SCHEDULER_BATCH=0` sends them
//! looking for a flag they never typed.

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{Arg, Command};
use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};

/// A process's settings: its flags and variables, plus what no single flag can tell.
pub trait Settings: clap::Parser {
    /// Checks across settings, after each parsed on its own; `names` names them in the refusal.
    fn check(&self, names: &SettingNames) -> Result<(), String> {
        let _ = names;
        Ok(())
    }
}

/// Parses a process's settings from its command line and environment, or exits as clap does
/// (code 2, one line, before anything connects), naming each refused setting as it was set.
pub fn parse_settings<T: Settings>() -> T {
    let names = SettingNames::new(&T::command(), std::env::args_os().skip(1), |variable| {
        std::env::var_os(variable).is_some()
    });
    let settings = T::try_parse().unwrap_or_else(|e| names.rename(e).exit());
    if let Err(why) = settings.check(&names) {
        T::command().error(ErrorKind::ArgumentConflict, why).exit();
    }
    settings
}

/// For each setting whose value came from its variable (its flag was not typed and the
/// variable is set; clap takes a typed flag over the variable), that variable's name.
#[derive(Debug)]
pub struct SettingNames {
    /// Keyed by the flag's long name, without dashes.
    from_variable: HashMap<String, String>,
    /// A flag as clap shows it in an error (`--batch <BATCH>`), to its long name.
    shown: HashMap<String, String>,
    /// The settings whose values are secrets (`hide_env_values`: a key, a URL with a password):
    /// a refusal names them without their value, which is often one typo from the real one.
    secret: HashSet<String>,
}

impl SettingNames {
    /// `args` is the command line without the program name; `is_set` tells whether a variable
    /// is set (the process's environment, or a test's).
    pub fn new(cmd: &Command, args: impl IntoIterator<Item = OsString>, is_set: impl Fn(&OsStr) -> bool) -> Self {
        let typed: Vec<String> = args
            .into_iter()
            .map_while(|arg| arg.into_string().ok().filter(|arg| arg != "--"))
            .filter_map(|arg| Some(arg.strip_prefix("--")?.split('=').next()?.to_owned()))
            .collect();
        let mut cmd = cmd.clone();
        cmd.build();
        let mut names = SettingNames {
            from_variable: HashMap::new(),
            shown: HashMap::new(),
            secret: HashSet::new(),
        };
        names.gather(&cmd, &typed, &is_set);
        names
    }

    fn gather(&mut self, cmd: &Command, typed: &[String], is_set: &impl Fn(&OsStr) -> bool) {
        for arg in cmd.get_arguments() {
            self.note(arg, typed, is_set);
        }
        for sub in cmd.get_subcommands() {
            self.gather(sub, typed, is_set);
        }
    }

    fn note(&mut self, arg: &Arg, typed: &[String], is_set: &impl Fn(&OsStr) -> bool) {
        let Some(long) = arg.get_long() else { return };
        self.shown.insert(arg.to_string(), long.to_owned());
        if arg.is_hide_env_values_set() {
            self.secret.insert(long.to_owned());
        }
        if let Some(variable) = arg.get_env()
            && is_set(variable)
            && !typed.iter().any(|t| t == long)
        {
            self.from_variable
                .insert(long.to_owned(), variable.to_string_lossy().into_owned());
        }
    }

    /// The setting of flag `--{long}`: its variable when its value came from there.
    pub fn name(&self, long: &str) -> String {
        self.from_variable
            .get(long)
            .cloned()
            .unwrap_or_else(|| format!("--{long}"))
    }

    /// Names the variable in clap's refusal of a value that came from one, and leaves a secret
    /// value out of it.
    pub fn rename(&self, mut error: clap::Error) -> clap::Error {
        let long = match error.get(ContextKind::InvalidArg) {
            Some(ContextValue::String(shown)) => self.shown.get(shown).cloned(),
            _ => None,
        };
        let Some(long) = long else { return error };
        if let Some(variable) = self.from_variable.get(&long) {
            error.insert(ContextKind::InvalidArg, ContextValue::String(variable.clone()));
        }
        if self.secret.contains(&long) && error.get(ContextKind::InvalidValue).is_some() {
            error.insert(ContextKind::InvalidValue, ContextValue::String("(hidden)".into()));
        }
        error
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Parser, Debug)]
    struct Cli {
        #[arg(long, env = "T_BATCH", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
        batch: u16,
        #[arg(long, env = "T_POLL", default_value_t = 1)]
        poll: u16,
        #[arg(long, env = "T_KEY", hide_env_values = true, value_parser = clap::value_parser!(u16))]
        key: Option<u16>,
        #[command(subcommand)]
        sub: Option<Sub>,
    }

    #[derive(clap::Subcommand, Debug)]
    enum Sub {
        Serve {
            #[arg(long, env = "T_RATE", default_value_t = 1)]
            rate: u16,
        },
    }

    fn names(args: &[&str], set: &'static [&'static str]) -> SettingNames {
        SettingNames::new(&Cli::command(), args.iter().map(OsString::from), |v| {
            set.iter().any(|s| OsStr::new(s) == v)
        })
    }

    fn refusal(names: &SettingNames, args: &[&str]) -> String {
        let error = Cli::try_parse_from(std::iter::once("x").chain(args.iter().copied())).unwrap_err();
        names.rename(error).to_string()
    }

    #[test]
    fn a_setting_is_named_by_its_variable_only_when_its_value_came_from_there() {
        let names = names(&["--poll=3", "serve"], &["T_BATCH", "T_POLL", "T_RATE"]);
        assert_eq!(names.name("batch"), "T_BATCH");
        assert_eq!(names.name("poll"), "--poll", "a typed flag wins over its variable");
        assert_eq!(names.name("rate"), "T_RATE", "a subcommand's settings too");
        let unset = self::names(&[], &[]);
        assert_eq!(unset.name("batch"), "--batch", "a default is named by its flag");
        let after_dashes = self::names(&["--", "--batch"], &["T_BATCH"]);
        assert_eq!(after_dashes.name("batch"), "T_BATCH", "nothing after `--` is a flag");
    }

    #[test]
    fn a_refused_value_names_the_variable_it_came_from() {
        // As if T_BATCH=0 were set: clap refuses "0" for `--batch`, which was never typed.
        let from_variable = names(&[], &["T_BATCH"]);
        let message = refusal(&from_variable, &["--batch", "0"]);
        assert!(message.contains("invalid value '0' for 'T_BATCH'"), "{message}");
        let typed = names(&["--batch", "0"], &["T_BATCH"]);
        let message = refusal(&typed, &["--batch", "0"]);
        assert!(message.contains("for '--batch <BATCH>'"), "{message}");
        let other = names(&[], &["T_POLL"]);
        let message = refusal(&other, &["--batch", "0"]);
        assert!(message.contains("for '--batch <BATCH>'"), "{message}");
    }

    #[test]
    fn a_refused_secret_is_named_without_its_value() {
        for set in [&[][..], &["T_KEY"][..]] {
            let message = refusal(&names(&[], set), &["--key", "s3cr3t"]);
            assert!(!message.contains("s3cr3t"), "{message}");
            assert!(message.contains("invalid value '(hidden)' for"), "{message}");
        }
        let message = refusal(&names(&[], &[]), &["--batch", "0"]);
        assert!(
            message.contains("invalid value '0'"),
            "other values are shown: {message}"
        );
    }
}
