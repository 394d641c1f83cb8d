# Downloads run on the submitting host: cluster nodes often have no internet.
localrules:
    fetch,


rule fetch:
    output:
        directory("resources/downloads/{download}"),
    log:
        "results/logs/downloads/{download}.log",
    benchmark:
        "results/benchmarks/downloads/{download}.tsv"
    retries: 2
    conda:
        "../../envs/data.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=240,
    params:
        spec=lambda w: to_json(config["downloads"][w.download]),
        cache="resources/downloads/.cache",
    shell:
        "ood fetch --name {wildcards.download} --spec {params.spec:q}"
        " --out {output} --cache {params.cache} 2> {log}"


rule curate_dataset:
    input:
        unpack(curate_inputs),
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
        mem_mb=4000,
        runtime=720,
    params:
        spec=lambda w: to_json(curation_spec(w.dataset)),
        inputs=lambda w: to_json(source_dirs(w)),
        out=lambda w: f"resources/data/{w.dataset}",
    shell:
        "ood curate --name {wildcards.dataset} --spec {params.spec:q}"
        " --inputs {params.inputs:q} --out {params.out} 2> {log}"


rule audit:
    input:
        id=lambda w: manifest(BENCHMARKS[w.benchmark]["id_dataset"]),
        ood=lambda w: manifest(w.dataset),
    output:
        directory("results/audit/{benchmark}/{dataset}"),
    log:
        "results/logs/audit/{benchmark}/{dataset}.log",
    benchmark:
        "results/benchmarks/audit/{benchmark}/{dataset}.tsv"
    conda:
        "../../envs/score.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
    params:
        threshold=lambda w: BENCHMARKS[w.benchmark]["audit"]["threshold"],
        size=lambda w: BENCHMARKS[w.benchmark]["audit"]["size"],
        drop=lambda w: "--drop" if deduplicated(w.benchmark, w.dataset) else "",
    shell:
        "ood audit --id-manifest {input.id} --ood-manifest {input.ood} --out {output}"
        " --threshold {params.threshold} --size {params.size} {params.drop} 2> {log}"
