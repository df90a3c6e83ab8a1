from server.bench.run import main

main()
