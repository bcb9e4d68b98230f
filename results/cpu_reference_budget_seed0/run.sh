#!/bin/bash
cd /work/main
date +%s > /work/runs/ref60/t0
m4oe pretrain configs/cpu_reference.yaml -o /work/runs/ref60/pretrain --cache /work/cache_ref
date +%s > /work/runs/ref60/t1
m4oe train configs/cpu_reference.yaml -o /work/runs/ref60/train --cache /work/cache_ref --init /work/runs/ref60/pretrain
date +%s > /work/runs/ref60/t2
