# Included at llama-cpp-python's project(): installs every CPU backend variant
# (GGML_CPU_ALL_VARIANTS) next to libggml in the wheel, which llama-cpp-python's
# own install rules leave out (they name the single "ggml-cpu" target only).
function(edgefleet_install_cpu_variants)
    get_property(targets DIRECTORY "${CMAKE_SOURCE_DIR}/vendor/llama.cpp/ggml/src" PROPERTY BUILDSYSTEM_TARGETS)
    foreach(target IN LISTS targets)
        if(target MATCHES "^ggml-cpu-")
            install(TARGETS ${target} LIBRARY DESTINATION ${SKBUILD_PLATLIB_DIR}/llama_cpp/lib)
            set_target_properties(${target} PROPERTIES INSTALL_RPATH "$ORIGIN" BUILD_WITH_INSTALL_RPATH TRUE)
            message(STATUS "edgefleet: installing CPU variant ${target}")
        endif()
    endforeach()
endfunction()
cmake_language(DEFER DIRECTORY "${CMAKE_SOURCE_DIR}" CALL edgefleet_install_cpu_variants)
