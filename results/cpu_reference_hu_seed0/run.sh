#!/bin/bash
cd /work/main

R=RUN
date +%s > $R/t0
m4oe pretrain configs/cpu_reference.yaml -o $R/pretrain --cache CACHE --set train.seed=0
date +%s > $R/t1
m4oe train configs/cpu_reference.yaml -o $R/train --cache CACHE --init $R/pretrain --set train.seed=0
date +%s > $R/t2
