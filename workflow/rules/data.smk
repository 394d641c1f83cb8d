rule curate_dataset:
    output:
        manifest("{dataset}"),
    log:
        "results/logs/data/{dataset}.log",
    benchmark:
        "results/benchmarks/data/{dataset}.tsv"
    conda:
        "../../envs/data.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    params:
        spec=lambda w: to_json(config["datasets"][w.dataset]),
        out=lambda w: f"resources/data/{w.dataset}",
    shell:
        "ood curate --name {wildcards.dataset} --spec {params.spec:q} --out {params.out} 2> {log}"
