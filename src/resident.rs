//! What of Warden's own binary stays mapped once it serves.
//!
//! Starting touches tens of megabytes of machine code that serving never
//! runs again: DuckDB registering its catalog, functions and extensions,
//! cranelift compiling the policies. Those pages stay in Warden's resident
//! set (38 MB of the 68 MB of `.text` after start, of which a load run uses
//! a fraction). Dropping the executable's code mapping once started gives
//! them back to the page cache; the code that serving runs faults back in
//! from there on first use (a minor fault, no disk read).

/// Drops the resident pages of the executable's own code mapping; returns
/// the bytes dropped. Only code, never the relocated read-only data (RELRO)
/// or anything written: a mapping is dropped only if none of its pages is
/// the process's own copy.
pub fn release_startup_code() -> usize {
    let Ok(exe) = std::fs::read_link("/proc/self/exe") else {
        return 0;
    };
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return 0;
    };
    let mut released = 0;
    for mapping in code_mappings(&smaps, &exe.to_string_lossy()) {
        // SAFETY: the range is a whole mapping of the executable's unmodified
        // code (read-only, private, no page copied); MADV_DONTNEED on it only
        // makes its next access fault the same bytes back in from the file.
        let done = unsafe {
            libc::madvise(
                mapping.start as *mut libc::c_void,
                mapping.end - mapping.start,
                libc::MADV_DONTNEED,
            )
        };
        if done == 0 {
            released += mapping.resident;
        }
    }
    released
}

#[derive(Debug, PartialEq, Eq)]
struct CodeMapping {
    start: usize,
    end: usize,
    resident: usize,
}

/// The executable's `r-xp` mappings with no anonymous (copied) page, from
/// the text of `/proc/self/smaps`.
fn code_mappings(smaps: &str, exe: &str) -> Vec<CodeMapping> {
    let mut found = Vec::new();
    let mut current: Option<(CodeMapping, bool)> = None;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or_default();
        if let Some((start, end)) = first.split_once('-')
            && let (Ok(start), Ok(end)) = (
                usize::from_str_radix(start, 16),
                usize::from_str_radix(end, 16),
            )
        {
            if let Some((mapping, clean)) = current.take()
                && clean
            {
                found.push(mapping);
            }
            let perms = fields.next().unwrap_or_default();
            let path = fields.nth(3).unwrap_or_default();
            if perms == "r-xp" && path == exe {
                current = Some((
                    CodeMapping {
                        start,
                        end,
                        resident: 0,
                    },
                    true,
                ));
            }
            continue;
        }
        let Some((mapping, clean)) = current.as_mut() else {
            continue;
        };
        let kilobytes = fields
            .next()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0);
        match first {
            "Rss:" => mapping.resident = kilobytes * 1024,
            // A page the process wrote (copied on write) is anonymous.
            // Private_Dirty is no guide: it also counts file pages not yet
            // written back, as a just-built binary's are.
            "Anonymous:" if kilobytes > 0 => *clean = false,
            _ => {}
        }
    }
    if let Some((mapping, true)) = current {
        found.push(mapping);
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0000000-55d0c1000000 r--p 00000000 08:01 42 /usr/bin/warden
Rss:                4096 kB
Private_Dirty:         0 kB
55d0c1000000-55d0c5000000 r-xp 01000000 08:01 42 /usr/bin/warden
Rss:               38912 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
55d0c5000000-55d0c5100000 r--p 05000000 08:01 42 /usr/bin/warden
Rss:                1024 kB
Private_Dirty:      1024 kB
7f0000000000-7f0000100000 r-xp 00000000 08:01 7 /usr/lib/libc.so.6
Rss:                 900 kB
7f0000200000-7f0000300000 r-xp 00000000 08:01 42 /usr/bin/warden
Rss:                  64 kB
Private_Dirty:         4 kB
Anonymous:             4 kB
";

    #[test]
    fn only_the_executables_clean_code_is_dropped() {
        assert_eq!(
            code_mappings(SMAPS, "/usr/bin/warden"),
            [CodeMapping {
                start: 0x55d0c1000000,
                end: 0x55d0c5000000,
                resident: 38912 * 1024,
            }]
        );
    }

    #[test]
    fn dropping_code_pages_leaves_the_process_running() {
        // The real thing, on this test binary: its code was resident, and
        // what it runs next (the same function again) faults back in.
        assert!(release_startup_code() > 0);
        assert!(release_startup_code() > 0);
    }
}
