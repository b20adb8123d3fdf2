from dpobench.cli import main

main()
