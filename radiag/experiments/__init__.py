"""`radiag experiments`: the paper's comparisons (teacher prompting, student recipes,
modalities, baselines) as arms of one experiment over shared stages; see `runner`."""
