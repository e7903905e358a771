from memtrain.cli import entry

entry()
