rule score:
    input:
        unpack(score_inputs),
    output:
        "results/scores/{benchmark}/{method}/seed{seed}/{scorer}/{dataset}.parquet",
    log:
        "results/logs/scores/{benchmark}/{method}/seed{seed}/{scorer}/{dataset}.log",
    benchmark:
        "results/benchmarks/scores/{benchmark}/{method}/seed{seed}/{scorer}/{dataset}.tsv"
    conda:
        "../../envs/score.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        scorer_params=lambda w: to_json(BENCHMARKS[w.benchmark]["scorers"][w.scorer]),
        train=lambda w, input: (
            f"--train {input.train}" if "train" in input.keys() else ""
        ),
    shell:
        "ood score --scorer {wildcards.scorer} --params {params.scorer_params:q}"
        " --test {input.test} {params.train} --out {output} --threads {threads} 2> {log}"
