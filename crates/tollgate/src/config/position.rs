//! Where each node of a YAML document was written, by config path
//! (`policies[0].limits.free.when[1]`), so problems found after deserialisation
//! (CEL errors, dangling references) can still name a line and column.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

#[derive(Debug, Default, Clone)]
pub struct PositionIndex {
    /// path → (line, column), both 1-based.
    at: HashMap<String, (usize, usize)>,
}

enum Frame {
    Map { path: String, key: Option<String> },
    Seq { path: String, next: usize },
}

struct Builder {
    stack: Vec<Frame>,
    index: PositionIndex,
}

impl Builder {
    /// Path of the node that starts now, and advance the parent's cursor.
    fn child_path(&mut self) -> Option<String> {
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Seq { path, next }) => {
                let p = format!("{path}[{next}]");
                *next += 1;
                Some(p)
            }
            Some(Frame::Map { path, key }) => key.take().map(|k| join(path, &k)),
        }
    }

    fn record(&mut self, path: &str, mark: Marker) {
        self.index
            .at
            .entry(path.to_owned())
            .or_insert((mark.line().max(1), mark.col() + 1));
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(value, ..) => {
                // A scalar in key position of a mapping is a key, not a value.
                if let Some(Frame::Map { path, key }) = self.stack.last_mut() {
                    if key.is_none() {
                        let p = join(path, &value);
                        *key = Some(value);
                        self.record(&p, mark);
                        return;
                    }
                }
                if let Some(p) = self.child_path() {
                    self.record(&p, mark);
                }
            }
            Event::MappingStart(..) => {
                let path = self.child_path().unwrap_or_default();
                self.record(&path, mark);
                self.stack.push(Frame::Map { path, key: None });
            }
            Event::SequenceStart(..) => {
                let path = self.child_path().unwrap_or_default();
                self.record(&path, mark);
                self.stack.push(Frame::Seq { path, next: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            Event::Alias(_) => {
                let _ = self.child_path();
            }
            _ => {}
        }
    }
}

impl PositionIndex {
    /// Build the index; a document the scanner refuses yields an empty index (the
    /// deserialiser reports that error with its own position).
    pub fn build(src: &str) -> Self {
        let mut b = Builder {
            stack: Vec::new(),
            index: PositionIndex::default(),
        };
        let mut parser = Parser::new_from_str(src);
        let _ = parser.load(&mut b, false);
        b.index
    }

    /// Position of `path`, or of its nearest recorded ancestor.
    pub fn locate(&self, path: &str) -> Option<(usize, usize)> {
        let mut p = path;
        loop {
            if let Some(pos) = self.at.get(p) {
                return Some(*pos);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locates_nested_paths() {
        let src = "listen: x\npolicies:\n  - name: p\n    limits:\n      free:\n        when:\n          - a == b\n          - c\n";
        let idx = PositionIndex::build(src);
        assert_eq!(idx.locate("listen"), Some((1, 1)));
        assert_eq!(idx.locate("policies[0].name"), Some((3, 5)));
        assert_eq!(idx.locate("policies[0].limits.free.when[1]"), Some((8, 13)));
        // Unknown leaf falls back to its parent.
        assert_eq!(idx.locate("policies[0].limits.free.nope"), Some((5, 7)));
    }
}
