//! Criterion bench for workflow validation: a 1,000-step definition, every
//! step needing earlier ones and reading an upstream output in its
//! instructions (parse, petgraph checks, template references).
//!
//!     cargo bench --bench workflow

use std::fmt::Write;
use std::path::Path;

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use warden::workflow::{Definition, WorkflowAgents};

fn thousand_steps() -> String {
    let mut text = String::from(
        "name = \"big\"\ndescription = \"1,000 steps\"\n\n[inputs]\ntopic = { type = \"string\", required = true }\n",
    );
    for i in 0..1_000 {
        let _ = write!(text, "\n[[steps]]\nid = \"s{i}\"\nagent = \"worker\"\n");
        if i > 0 {
            let needs: Vec<String> = [i - 1, i / 2, i / 3]
                .iter()
                .filter(|n| **n < i)
                .map(|n| format!("\"s{n}\""))
                .collect();
            let _ = writeln!(text, "needs = [{}]", needs.join(", "));
            let _ = writeln!(
                text,
                "instructions = \"Continue {{{{ inputs.topic }}}} from {{{{ steps.s{}.output }}}}\"",
                i / 2
            );
        } else {
            text.push_str("instructions = \"Start on {{ inputs.topic }}\"\n");
        }
    }
    text
}

fn validation(c: &mut Criterion) {
    let text = thousand_steps();
    let agents = WorkflowAgents {
        agents: Some([("worker".to_owned(), Vec::new())].into_iter().collect()),
    };
    Definition::parse(&text, Path::new("big.toml"), &agents)
        .expect("the generated workflow is valid");
    c.bench_function("validate 1,000-step workflow", |b| {
        b.iter(|| Definition::parse(black_box(&text), Path::new("big.toml"), &agents).unwrap())
    });
}

criterion_group!(benches, validation);
criterion_main!(benches);
