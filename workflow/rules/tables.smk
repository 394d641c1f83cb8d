rule tables:
    input:
        features=all_id_test_features(),
        scores=all_score_files(),
        audits=all_audits(),
    output:
        csv=report(
            "results/tables/all.csv",
            caption="../report/all_csv.rst",
            category="Tables",
        ),
        markdown=report(
            expand("results/tables/{benchmark}.md", benchmark=BENCHMARKS),
            caption="../report/summary_md.rst",
            category="Tables",
        ),
    log:
        "results/logs/tables.log",
    benchmark:
        "results/benchmarks/tables.tsv"
    conda:
        "../../envs/score.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        benchmarks=benchmark_groups(),
    shell:
        "ood tables --benchmarks {params.benchmarks:q} --csv {output.csv}"
        " --features {input.features} --scores {input.scores} 2> {log}"
