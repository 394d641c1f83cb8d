# DreamOOD-style outlier synthesis with Stable Diffusion (ood/synthesis/):
# class token embeddings -> boundary samples -> images, in shards -> one outlier set.
# Everything lands under results/outliers/<benchmark>/<synthesis name>/.


rule tiny_pipeline:
    output:
        directory("resources/pipelines/tiny_sd"),
    log:
        "results/logs/synthesis/tiny_pipeline.log",
    conda:
        "../../envs/synthesis.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    shell:
        "ood synth-pipeline --out {output} --resolution 32 2> {log}"


rule synth_embed:
    input:
        manifest=lambda w: manifest(BENCHMARKS[w.benchmark]["id_dataset"]),
        pipeline=synth_pipeline,
    output:
        "results/outliers/{benchmark}/{synth}/embeddings.pt",
    log:
        "results/logs/synthesis/{benchmark}/{synth}/embed.log",
    benchmark:
        "results/benchmarks/synthesis/{benchmark}/{synth}/embed.tsv"
    conda:
        "../../envs/synthesis.yaml"
    threads: 4
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=0 if config["device"] == "cpu" else 1,
    params:
        settings=lambda w: to_json(synth_embed_settings(w)),
        device=config["device"],
    shell:
        "ood synth-embed --manifest {input.manifest} --pipeline {input.pipeline}"
        " --out {output} --settings {params.settings:q}"
        " --device {params.device} --threads {threads} 2> {log}"


rule synth_generate:
    input:
        embeddings="results/outliers/{benchmark}/{synth}/embeddings.pt",
        pipeline=synth_pipeline,
    output:
        "results/outliers/{benchmark}/{synth}/shards/{shard}of{shards}.csv",
    log:
        "results/logs/synthesis/{benchmark}/{synth}/shard{shard}of{shards}.log",
    benchmark:
        "results/benchmarks/synthesis/{benchmark}/{synth}/shard{shard}of{shards}.tsv"
    conda:
        "../../envs/synthesis.yaml"
    threads: 4
    resources:
        mem_mb=16000,
        runtime=1440,
        gpu=0 if config["device"] == "cpu" else 1,
    params:
        root=synth_root,
        settings=lambda w: to_json(synth_spec(w).get("sample", {})),
        device=config["device"],
    shell:
        "ood synth-generate --embeddings {input.embeddings} --pipeline {input.pipeline}"
        " --root {params.root} --shard {wildcards.shard}of{wildcards.shards}"
        " --out {output} --settings {params.settings:q}"
        " --device {params.device} --threads {threads} 2> {log}"


rule synth_collect:
    input:
        shards=synth_shards,
        id_manifest=lambda w: manifest(BENCHMARKS[w.benchmark]["id_dataset"]),
    output:
        manifest="results/outliers/{benchmark}/{synth}/set/manifest.csv",
        overview=report(
            "results/outliers/{benchmark}/{synth}/overview.png",
            caption="../report/synthesis_overview.rst",
            category="Outlier synthesis",
            labels={"benchmark": "{benchmark}", "set": "{synth}"},
        ),
    log:
        "results/logs/synthesis/{benchmark}/{synth}/collect.log",
    conda:
        "../../envs/synthesis.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        root=synth_root,
        settings=lambda w: to_json(synth_spec(w).get("sample", {})),
        # streamed models crop any size: keep the generated one
        keep_size=lambda w: (
            "--keep-size" if benchmark_images(w.benchmark) == "stream" else ""
        ),
    shell:
        "ood synth-collect --shards {input.shards} --root {params.root}"
        " --id-manifest {input.id_manifest} --out {output.manifest}"
        " --overview {output.overview} --settings {params.settings:q} {params.keep_size}"
        " 2> {log}"
