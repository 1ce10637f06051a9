#include "harness.hpp"

#include <cstdio>
#include <cstring>
#include <map>
#include <string>

namespace dmabufd_test {

namespace {

std::map<std::string, void (*)()>& registry() {
    static std::map<std::string, void (*)()> tests;
    return tests;
}

// 0 passed, 1 failed.
int run_one(const std::string& name, void (*body)()) {
    std::printf("[ RUN  ] %s\n", name.c_str());
    std::fflush(stdout);
    try {
        body();
    } catch (const Failure& failure) {
        std::printf("[ FAIL ] %s\n  %s\n", name.c_str(), failure.message.c_str());
        return 1;
    } catch (const std::exception& error) {
        std::printf("[ FAIL ] %s\n  unexpected %s: %s\n", name.c_str(), typeid(error).name(), error.what());
        return 1;
    }
    std::printf("[  OK  ] %s\n", name.c_str());
    return 0;
}

}  // namespace

void fail(const std::string& message, const char* file, int line) {
    throw Failure{std::string(file) + ":" + std::to_string(line) + ": " + message};
}

Registration::Registration(const char* suite, const char* name, void (*body)()) {
    registry().emplace(std::string(suite) + "." + name, body);
}

}  // namespace dmabufd_test

int main(int argc, char** argv) {
    using dmabufd_test::registry;
    if (argc == 2 && std::strcmp(argv[1], "--list") == 0) {
        for (const auto& entry : registry()) {
            std::printf("%s\n", entry.first.c_str());
        }
        return 0;
    }
    if (argc == 3 && std::strcmp(argv[1], "--run") == 0) {
        const auto found = registry().find(argv[2]);
        if (found == registry().end()) {
            std::fprintf(stderr, "no test %s (--list shows them)\n", argv[2]);
            return 2;
        }
        return dmabufd_test::run_one(found->first, found->second);
    }
    if (argc != 1) {
        std::fprintf(stderr, "usage: %s [--list | --run SUITE.NAME]\n", argv[0]);
        return 2;
    }
    int failed = 0;
    for (const auto& entry : registry()) {
        failed += dmabufd_test::run_one(entry.first, entry.second);
    }
    std::printf("%zu tests, %d failed\n", registry().size(), failed);
    return failed == 0 ? 0 : 1;
}
