# oodbench: data -> synthesis -> train -> features -> scores -> tables.
# Run: snakemake --profile profiles/local [--configfile config/<benchmark>.yaml] results/tables/all.csv
# Without --configfile the embedded demo (config/config.yaml) runs.


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/synthesis.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/score.smk"
include: "workflow/rules/tables.smk"


rule all:
    default_target: True
    input:
        "results/tables/all.csv",
