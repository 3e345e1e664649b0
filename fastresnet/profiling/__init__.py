"""Where a step's time goes: torch.profiler traces read by category (`python -m fastresnet.profile`).

categories.py  the name tables: kernel or op -> category
timeline.py    a Chrome trace -> time per category (Breakdown)
work.py        FLOPs and bytes of an op from its recorded shapes
ceilings.py    copy bandwidth and matrix rate, measured in the calling process
providers.py   the step to profile: fastresnet's, torchvision's, torchvision's compiled
capture.py     warm-up, then N steps under torch.profiler
report.py      profile.md, profile.png, profile.json, kernels.tsv
"""
