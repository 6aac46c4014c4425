"""launch: the Hydra front end that starts syncbn jobs on torch's elastic agent (the machinery of torchrun).

python -m launch.run                          # train on 2 local gloo workers
python -m launch.run task=check               # cluster self-test
torchrun --standalone --nproc_per_node=2 -m launch.worker task=check
"""
