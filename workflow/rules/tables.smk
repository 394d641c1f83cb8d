# One long table and one readable summary per benchmark, so asking for one
# benchmark's table (results/tables/NAME.csv) builds that benchmark only.
# all.csv would also match benchmark_table with benchmark=all (a name the config
# rejects): the constraint keeps Snakemake from even trying it.


rule benchmark_table:
    input:
        features=lambda w: id_test_features(w.benchmark),
        scores=lambda w: score_dirs(w.benchmark),
        audits=lambda w: audits(w.benchmark),
    output:
        csv=report(
            "results/tables/{benchmark}.csv",
            caption="../report/all_csv.rst",
            category="Tables",
        ),
        markdown=report(
            "results/tables/{benchmark}.md",
            caption="../report/summary_md.rst",
            category="Tables",
        ),
    log:
        "results/logs/tables/{benchmark}.log",
    benchmark:
        "results/benchmarks/tables/{benchmark}.tsv"
    wildcard_constraints:
        benchmark=r"(?!all\.)[A-Za-z0-9_]+",
    conda:
        "../../envs/score.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        benchmarks=lambda w: benchmark_group(w.benchmark),
        scores=lambda w: score_files(w.benchmark),
    shell:
        "ood tables --benchmarks {params.benchmarks:q} --csv {output.csv}"
        " --features {input.features} --scores {params.scores} 2> {log}"


rule tables:
    input:
        expand("results/tables/{benchmark}.csv", benchmark=BENCHMARKS),
    output:
        report(
            "results/tables/all.csv",
            caption="../report/all_csv.rst",
            category="Tables",
        ),
    log:
        "results/logs/tables/all.log",
    conda:
        "../../envs/score.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "ood concat-tables {input} --out {output} 2> {log}"
