# One job per (model, scorer variant): fitted once on the ID train dump, it
# scores the ID test set and every OOD set of the benchmark into its folder.
rule score:
    input:
        unpack(score_inputs),
    output:
        directory("results/scores/{benchmark}/{method}/seed{seed}/{scorer}"),
    log:
        "results/logs/scores/{benchmark}/{method}/seed{seed}/{scorer}.log",
    benchmark:
        "results/benchmarks/scores/{benchmark}/{method}/seed{seed}/{scorer}.tsv"
    conda:
        "../../envs/score.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
        # A GPU only for scorers that run the model (gradients, input perturbation).
        gpu=lambda w: int(config["device"] != "cpu" and "model" in scorer_needs(w)),
    params:
        args=score_args,
    shell:
        "ood score {params.args} --threads {threads} 2> {log}"
