"""`python -m featcache …` is the `featcache` command (also under torchrun:
`torchrun --nproc_per_node 8 -m featcache extract …`)."""

from featcache.cli.main import main

if __name__ == "__main__":
    main()
