rule train:
    input:
        unpack(train_inputs),
    output:
        model="results/models/{benchmark}/{method}/seed{seed}/model.pt",
        log_csv=report(
            "results/models/{benchmark}/{method}/seed{seed}/train_log.csv",
            caption="../report/train_log.rst",
            category="Training",
            labels={
                "benchmark": "{benchmark}",
                "method": "{method}",
                "seed": "{seed}",
            },
        ),
    log:
        "results/logs/train/{benchmark}/{method}/seed{seed}.log",
    benchmark:
        "results/benchmarks/train/{benchmark}/{method}/seed{seed}.tsv"
    conda:
        "../../envs/torch.yaml"
    threads: 4
    resources:
        mem_mb=8000,
        runtime=720,
        # One GPU unless device is cpu (see profiles/local: --resources gpu=N).
        gpu=0 if config["device"] == "cpu" else 1,
    params:
        backbone=lambda w: method_backbone(BENCHMARKS[w.benchmark], w.method),
        settings=lambda w: to_json(method_settings(w)),
        resume_dir=lambda w: f"{model_dir(w)}/resume",
        extra=train_extra_args,
        device=config["device"],
    shell:
        "ood train --manifest {input.manifest} --method {wildcards.method}"
        " --backbone {params.backbone} --settings {params.settings:q} --seed {wildcards.seed}"
        " --out {output.model} --log-csv {output.log_csv} --resume-dir {params.resume_dir}"
        " {params.extra}"
        " --device {params.device} --threads {threads} 2> {log}"
