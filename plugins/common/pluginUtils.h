/*
 * TensorRT glue helpers shared by the nucleus plugins: logging through the loader's ILoggerFinder, plugin-field
 * parsing with clear messages, dtype mapping and the plugin-wide constants.
 */
#ifndef NUCLEUS_PLUGIN_UTILS_H
#define NUCLEUS_PLUGIN_UTILS_H

#include "nucleusKernelTypes.h"

#include <NvInferRuntime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace nucleus
{
namespace plugin
{

//! Namespace of every nucleus plugin creator (the ONNX domain of the custom ops). The ONNX parser looks creators up
//! by (op_type, plugin_version attribute or "1", plugin_namespace attribute or ""), and its fallback importer also
//! tries the node's domain: nodes of domain `nucleus` resolve here either way once they carry
//! plugin_namespace="nucleus" or their model-local function is removed.
constexpr char const* kPLUGIN_NAMESPACE = "nucleus";
constexpr char const* kPLUGIN_VERSION = "1";

//! Thrown while parsing or validating; createPlugin turns it into a logged error and a null plugin.
class PluginError : public std::runtime_error
{
public:
    using std::runtime_error::runtime_error;
};

void setLoggerFinder(nvinfer1::ILoggerFinder* finder) noexcept;
void logError(std::string const& message) noexcept;
void logWarning(std::string const& message) noexcept;

//! Reads the attributes of one PluginFieldCollection; every accessor names the plugin and field on failure.
class FieldReader
{
public:
    FieldReader(char const* pluginName, nvinfer1::PluginFieldCollection const* fc);

    bool has(char const* name) const;
    //! kINT32 (what the ONNX parser passes for INT attributes), kINT64, kINT16 or kINT8, one element.
    int32_t getInt32(char const* name) const;
    //! kFLOAT32 or kFLOAT64, one element.
    float getFloat32(char const* name) const;
    //! kCHAR of `length` bytes, with or without a terminating NUL.
    std::string getString(char const* name) const;
    //! Logs a warning for every field not in `known` (null-terminated list).
    void warnUnknown(char const* const* known) const;

private:
    nvinfer1::PluginField const& find(char const* name) const;

    std::string mPlugin;
    nvinfer1::PluginFieldCollection const* mFields;
};

//! NucleusDType of a TensorRT float type; throws PluginError for others.
NucleusDType toNucleusDType(nvinfer1::DataType type);
bool isFloatType(nvinfer1::DataType type) noexcept;

//! Throw PluginError(message) unless condition holds.
inline void check(bool condition, std::string const& message)
{
    if (!condition)
    {
        throw PluginError(message);
    }
}

} // namespace plugin
} // namespace nucleus

#endif // NUCLEUS_PLUGIN_UTILS_H
