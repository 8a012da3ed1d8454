# The same as ./run.sh, for those who type make.
.PHONY: demo test bench
demo test bench:
	./run.sh $@
