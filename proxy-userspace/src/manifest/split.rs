//! Parsing one large manifest on every CPU: the text is cut into runs of whole documents at
//! `---` lines, each run is parsed on a worker, and the objects are handed on in the file's
//! order on the calling thread. Each worker holds at most one parsed run ahead of the
//! reader, so memory stays that of a few runs, not of the file. A run that is not valid YAML
//! stops the parse; the caller parses the file again, alone, for the exact message.
use std::sync::mpsc;

use super::{Failed, Parsed};
use crate::rejection::{Reason, Rejection};

/// Runs of at least this many bytes: big enough that a worker's start costs nothing.
pub const RUN_BYTES: usize = 512 * 1024;

/// A run of whole documents and the index of its first document in the file.
#[derive(Debug, PartialEq)]
pub struct Run<'a> {
    pub text: &'a str,
    pub first_document: usize,
}

/// Whether `prefix` holds YAML content (a document), not only blank lines, comments and
/// directives: libyaml starts an implicit document only then.
fn has_content(prefix: &str) -> bool {
    prefix.lines().any(|l| {
        let l = l.trim();
        !(l.is_empty() || l.starts_with('#') || l.starts_with('%'))
    })
}

/// `text` cut before `---` lines into runs of at least `run_bytes`; one run if it is small,
/// has no such lines, or ends a document with `...` (after which a document may start
/// without a marker). Only a line that is exactly `---` cuts; `--- |` and the like start a
/// document inside a run.
pub fn runs(text: &str, run_bytes: usize) -> Vec<Run<'_>> {
    let whole = vec![Run {
        text,
        first_document: 0,
    }];
    if text.len() < 2 * run_bytes {
        return whole;
    }
    let mut runs = Vec::new();
    let (mut start, mut first_document) = (0, 0);
    // Documents started before `offset`.
    let (mut documents, mut offset) = (0, 0);
    for line in text.split_inclusive('\n') {
        let line_text = line.trim_end_matches(['\n', '\r']);
        if line_text == "..." {
            return whole;
        }
        let marker =
            line_text == "---" || line_text.starts_with("--- ") || line_text.starts_with("---\t");
        if marker {
            // Text before the first marker is a document only if it has content.
            if documents == 0 && has_content(&text[..offset]) {
                documents = 1;
            }
            if line_text == "---" && offset - start >= run_bytes {
                runs.push(Run {
                    text: &text[start..offset],
                    first_document,
                });
                (start, first_document) = (offset, documents);
            }
            documents += 1;
        }
        offset += line.len();
    }
    runs.push(Run {
        text: &text[start..],
        first_document,
    });
    runs
}

/// What a worker parsed of one run: its objects, and what failed or the YAML error.
type RunResult = (Vec<Parsed>, Result<Vec<Failed>, Rejection>);

/// Parses one run, handing its objects to the second argument.
pub type ParseRun<'p> =
    dyn Fn(&Run<'_>, &mut dyn FnMut(Parsed)) -> Result<Vec<Failed>, Rejection> + Sync + 'p;

/// Parses `runs` on up to `workers` threads with `parse(run, take)`, handing the objects
/// to `take` in order. Stops at the first run that is not valid YAML.
pub fn parse_in_parallel(
    runs: &[Run<'_>],
    workers: usize,
    parse: &ParseRun<'_>,
    take: &mut dyn FnMut(Parsed),
) -> Result<Vec<Failed>, Rejection> {
    let workers = workers.clamp(1, runs.len().max(1));
    std::thread::scope(|scope| {
        let receivers: Vec<mpsc::Receiver<RunResult>> = (0..workers)
            .map(|w| {
                let (tx, rx) = mpsc::sync_channel(1);
                scope.spawn(move || {
                    for run in runs.iter().skip(w).step_by(workers) {
                        let mut objects = Vec::new();
                        let result = parse(run, &mut |p| objects.push(p));
                        // The reader stopped (an error earlier in the file): so do we.
                        if tx.send((objects, result)).is_err() {
                            return;
                        }
                    }
                });
                rx
            })
            .collect();
        let mut failed = Vec::new();
        for i in 0..runs.len() {
            let (objects, result) = receivers[i % workers].recv().map_err(|_| {
                Rejection::new("manifest", "", Reason::Parse, "a parser thread stopped")
            })?;
            objects.into_iter().for_each(&mut *take);
            failed.extend(result?);
        }
        Ok(failed)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs as small as can be, for short texts (the size check needs twice the run size).
    fn runs_of(text: &str) -> Vec<Run<'_>> {
        runs(text, 1)
    }

    #[test]
    fn runs_start_at_separators_and_number_documents_as_libyaml_does() {
        let text = "# leading comment\n---\na: 1\n---\nb: 2\n--- |\n  c\n---\nd: 4\n";
        let cut = runs_of(text);
        let texts: Vec<&str> = cut.iter().map(|r| r.text).collect();
        assert_eq!(
            texts,
            [
                "# leading comment\n",
                "---\na: 1\n",
                "---\nb: 2\n--- |\n  c\n",
                "---\nd: 4\n"
            ]
        );
        let firsts: Vec<usize> = cut.iter().map(|r| r.first_document).collect();
        // The comment is no document: a is the first (index 0), d the fourth.
        assert_eq!(firsts, [0, 0, 1, 3]);

        let implicit = "a: 1\n---\nb: 2\n";
        let firsts: Vec<usize> = runs_of(implicit).iter().map(|r| r.first_document).collect();
        assert_eq!(firsts, [0, 1]);
        assert_eq!(runs(implicit, 1 << 20).len(), 1, "a small text is one run");
        assert_eq!(
            runs_of("a: 1\n...\n---\nb: 2\n").len(),
            1,
            "`...` keeps it whole"
        );
    }

    #[test]
    fn objects_come_in_order_and_the_first_error_stops() {
        let texts: Vec<String> = (0..20).map(|i| format!("{i}")).collect();
        let runs: Vec<Run<'_>> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| Run {
                text: t,
                first_document: i,
            })
            .collect();
        let parse = |run: &Run<'_>, _take: &mut dyn FnMut(Parsed)| {
            if run.first_document == 13 {
                Err(Rejection::new("m", "", Reason::Parse, "bad"))
            } else {
                Ok(vec![Failed {
                    rejection: Rejection::new(run.text, "", Reason::Parse, ""),
                    keep: None,
                }])
            }
        };
        let err = parse_in_parallel(&runs, 3, &parse, &mut |_| {}).unwrap_err();
        assert_eq!(err.detail, "bad");
        let ok: Vec<Run<'_>> = runs.into_iter().take(13).collect();
        let failed = parse_in_parallel(&ok, 3, &parse, &mut |_| {}).unwrap();
        let order: Vec<&str> = failed.iter().map(|f| f.rejection.object.as_str()).collect();
        assert_eq!(
            order,
            texts[..13].iter().map(String::as_str).collect::<Vec<_>>()
        );
    }
}
